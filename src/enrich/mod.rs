//! Enrich: what the plan needs besides the event — the host's Salesforce User Id and the last
//! version already applied — from caches held in sled, filled from Salesforce on a miss; and the
//! last good copy of each tenant file.
//!
//! sled stays behind [`Caches`]: nothing else in the crate names it. Every entry is a cache;
//! deleting the directory loses nothing but warm-up (and the fallback for a tenant file broken
//! before the next start), and an entry that does not decode is treated as a miss and
//! overwritten.

pub mod duplicates;
pub mod relations;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{CacheConfig, TenantSource};
use crate::event::BookingEvent;
use crate::plan::relations::Existing;
use crate::salesforce::model::SObjectDescribe;
use crate::salesforce::{Described, SalesforceClient, SalesforceError};
use crate::telemetry::metrics::Metrics;

/// What enrichment adds to the event for the templates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Enrichment {
    /// The host's Salesforce User Id, when a user has the host's email.
    pub host_user_id: Option<String>,
    /// The integration user's User Id (the fallback owner).
    pub integration_user_id: String,
}

/// The sled database could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cache database at {path}: {message}")]
pub struct CacheError {
    /// The directory.
    pub path: String,
    /// sled's error.
    pub message: String,
}

/// A cached describe and the `Last-Modified` to revalidate it with.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DescribeEntry {
    describe: SObjectDescribe,
    last_modified: Option<String>,
}

/// A cached host → User Id answer; `user_id: None` is a negative entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct UserEntry {
    user_id: Option<String>,
    expires_at: u64,
}

/// The last snapshot written for a booking, the record ids it produced, and the relations its
/// Event was left with (see [`relations`]): one sled entry, written once per booking.
/// Stored in postcard, whose fields are positional: a change of these fields needs a new
/// format byte ([`COMPACT`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Version applied.
    pub version: u64,
    /// referenceId → record id.
    pub record_ids: Vec<(String, String)>,
    /// The Event's relations after this version's graph committed; `None` when unknown (a
    /// tenant without a relations mapping, or forgotten after a graph failed on them).
    /// Always written (postcard's fields are positional); absent from an older JSON entry.
    #[serde(default)]
    pub relations: Option<Vec<Existing>>,
}

/// A booking's ledger entry as read ([`Caches::ledger_read`]), with the bytes it was read
/// from, so that the write after the booking committed replaces it without reading it again.
#[derive(Debug, Default)]
pub struct LedgerRead {
    /// The entry, when one is stored and decodes.
    pub entry: Option<LedgerEntry>,
    stored: Option<sled::IVec>,
}

/// A ledger entry as stored ([`StoredFormat::Compact`]): its version, then the time it was
/// written (for expiry), then the entry in postcard's encoding; `None` if it does not
/// serialise.
///
/// Why not JSON, as before: a booking's entry is written once per booking, and sled copies the
/// value again on every rewrite of its leaf (each tenth change of a node, and each split, every
/// sixteen keys); postcard writes the same entry without field names or quotes and with
/// integers as varints: 196 bytes against the previous JSON's 340 for a booking with one
/// attendee (the record ids are most of what is left).
fn ledger_bytes(entry: &LedgerEntry) -> Option<Vec<u8>> {
    compact_bytes(entry, now_secs())
}

/// `entry` in [`StoredFormat::Compact`], written at `written_at` (Unix seconds).
fn compact_bytes(entry: &LedgerEntry, written_at: u64) -> Option<Vec<u8>> {
    // Room for a typical entry (a few record ids and relations), so it is written without
    // growing the buffer on the way.
    let mut bytes = Vec::with_capacity(256);
    bytes.extend_from_slice(&entry.version.to_be_bytes());
    bytes.push(COMPACT);
    bytes.extend_from_slice(&written_at.to_be_bytes());
    postcard::to_extend(entry, bytes).ok()
}

/// Bytes of the big-endian version that prefixes a stored ledger entry (in both formats): an
/// entry whose own version is not this one is a miss.
const VERSION_PREFIX: usize = 8;

/// The byte after the version of an entry in [`StoredFormat::Compact`]: not `{`, which starts
/// the JSON of [`StoredFormat::Json`]. postcard's fields are positional: a change to the fields
/// of [`LedgerEntry`] or [`Existing`] is a new layout, which takes a new byte here (and a
/// reader of this one), or every stored entry would be misread or missed
/// (`tests::the_compact_layout_is_pinned` fails first).
const COMPACT: u8 = 1;

/// Bytes of the big-endian `written_at` (Unix seconds) after [`COMPACT`].
const WRITTEN_AT: usize = 8;

/// Bytes before the postcard of a [`StoredFormat::Compact`] entry.
const COMPACT_HEADER: usize = VERSION_PREFIX + 1 + WRITTEN_AT;

/// The two shapes of a stored ledger entry this release reads; it writes only the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoredFormat {
    /// `version` (u64, big-endian), [`COMPACT`], `written_at` (u64, big-endian), the entry in
    /// postcard (<https://postcard.jamesmunns.com/wire-format>).
    Compact,
    /// The previous release's: `version` (u64, big-endian), then the entry and `written_at` as
    /// one JSON object.
    Json,
}

/// The format of stored ledger bytes, `None` for bytes of another shape (an older release's
/// entry is JSON from its first byte).
fn stored_format(bytes: &[u8]) -> Option<StoredFormat> {
    match bytes.get(VERSION_PREFIX)? {
        &COMPACT => Some(StoredFormat::Compact),
        b'{' => Some(StoredFormat::Json),
        _ => None,
    }
}

/// The entry stored `bytes` hold and when it was written (Unix seconds; 0 for a JSON entry that
/// does not say). `None` — a miss, overwritten by the next write and removed by the next expiry
/// pass — for bytes of another shape, bytes that do not decode whole, or an entry whose version
/// is not the one its prefix says.
fn stored_entry(bytes: &[u8]) -> Option<(LedgerEntry, u64)> {
    let prefix = u64::from_be_bytes(bytes.get(..VERSION_PREFIX)?.try_into().ok()?);
    let (entry, written_at) = match stored_format(bytes)? {
        StoredFormat::Compact => {
            let written_at = bytes.get(VERSION_PREFIX + 1..COMPACT_HEADER)?;
            let (entry, rest) =
                postcard::take_from_bytes::<LedgerEntry>(bytes.get(COMPACT_HEADER..)?).ok()?;
            if !rest.is_empty() {
                return None;
            }
            (entry, u64::from_be_bytes(written_at.try_into().ok()?))
        }
        StoredFormat::Json => {
            let stored: JsonEntry = serde_json::from_slice(bytes.get(VERSION_PREFIX..)?).ok()?;
            (stored.entry, stored.written_at)
        }
    };
    (entry.version == prefix).then_some((entry, written_at))
}

/// A ledger entry in [`StoredFormat::Json`]: the entry's fields and its expiry stamp (0 when it
/// has none) in one object.
#[derive(Deserialize)]
struct JsonEntry {
    #[serde(flatten)]
    entry: LedgerEntry,
    #[serde(default)]
    written_at: u64,
}

/// A tenant file that worked, kept so a restart survives a broken edit of it.
#[derive(Debug, Serialize, Deserialize)]
struct TenantEntry {
    text: String,
    stored_at: u64,
}

/// Most host look-ups kept in memory in front of sled: a tenant has few hosts and every
/// booking asks for one, so this spares a sled read and a decode per booking. Cleared when
/// full, as a cache may be.
const RECENT_USERS: usize = 10_000;

/// The in-memory front of the `users` tree (same keys and entries).
type RecentUsers = Arc<std::sync::RwLock<std::collections::HashMap<Vec<u8>, UserEntry>>>;

/// Per-key locks of in-progress user look-ups.
type LookupLocks =
    Arc<std::sync::Mutex<std::collections::HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>>;

/// The caches of DESIGN.md §8 that the pipeline reads.
#[derive(Clone)]
pub struct Caches {
    users: sled::Tree,
    ledger: sled::Tree,
    /// `tenant/sObject/field/key` → the existing record a duplicate rule matched, written in
    /// that record's place (see [`duplicates`]).
    duplicates: sled::Tree,
    describes: sled::Tree,
    tenants: sled::Tree,
    db: sled::Db,
    user_ttl: Duration,
    negative_ttl: Duration,
    metrics: Arc<Metrics>,
    /// One Salesforce lookup per host at a time: a burst of bookings for a new host would
    /// otherwise send one identical SOQL query per booking. A std Mutex, held only to clone
    /// the per-key lock out of the map.
    lookups: LookupLocks,
    /// Host → User Id answers read or written lately ([`RECENT_USERS`]).
    recent_users: RecentUsers,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn key(tenant: &str, id: &str) -> Vec<u8> {
    format!("{tenant}/{id}").into_bytes()
}

/// sled's settings for `config`: its page cache is `memory_mb` MiB (the resident set is about
/// twice that), and writes are flushed every 500 ms (losing the last half second of a cache
/// costs a look-up, never a booking).
fn sled_config(config: &CacheConfig) -> sled::Config {
    sled::Config::new()
        .path(&config.path)
        .cache_capacity(config.memory_mb * 1024 * 1024)
        .flush_every_ms(Some(500))
}

/// How long opening the database waits for the lock a previous handle still holds.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens the database, waiting up to [`LOCK_WAIT`] while its file lock is held: sled releases
/// it from its background I/O threads after the last handle is dropped, so a worker restarted
/// in place (or a test reopening the directory) can find it held for a moment.
fn open_waiting_for_lock(config: &sled::Config) -> Result<sled::Db, sled::Error> {
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    loop {
        match config.open() {
            // sled 0.34 reports a held lock as `ErrorKind::Other` "could not acquire lock on
            // …" (its config.rs), the OS's WouldBlock only in the text.
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock") && waited < LOCK_WAIT =>
            {
                std::thread::sleep(step);
                waited += step;
            }
            other => return other,
        }
    }
}

impl Caches {
    /// Opens (or creates) the database at `config.path`. A corrupt or older-format database
    /// holds only caches, so it is moved aside and rebuilt rather than stopping the service.
    pub fn open(config: &CacheConfig, metrics: Arc<Metrics>) -> Result<Self, CacheError> {
        let path = config.path.as_path();
        let user_ttl = Duration::from_secs(config.user_ttl_secs);
        let negative_ttl = Duration::from_secs(config.negative_ttl_secs);
        let fail = |e: sled::Error| CacheError {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let open = || open_waiting_for_lock(&sled_config(config));
        let db = match open() {
            Ok(db) => db,
            Err(error @ (sled::Error::Corruption { .. } | sled::Error::Unsupported(_))) => {
                let aside = path.with_extension(format!(
                    "corrupt-{}",
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or_default()
                ));
                tracing::warn!(%error, moved_to = %aside.display(), "cache database unreadable; rebuilding it");
                std::fs::rename(path, &aside).map_err(|e| CacheError {
                    path: path.display().to_string(),
                    message: format!("unreadable ({error}) and cannot be moved aside: {e}"),
                })?;
                open().map_err(fail)?
            }
            Err(error) => return Err(fail(error)),
        };
        Self::from_db(db, user_ttl, negative_ttl, metrics).map_err(fail)
    }

    /// A cache that lives only as long as the process (one-off commands such as `doctor`, which
    /// must not contend for the service's database lock).
    pub fn temporary(metrics: Arc<Metrics>) -> Result<Self, CacheError> {
        let fail = |e: sled::Error| CacheError {
            path: "(temporary)".into(),
            message: e.to_string(),
        };
        let db = sled::Config::new().temporary(true).open().map_err(fail)?;
        Self::from_db(
            db,
            Duration::from_secs(60),
            Duration::from_secs(60),
            metrics,
        )
        .map_err(fail)
    }

    fn from_db(
        db: sled::Db,
        user_ttl: Duration,
        negative_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, sled::Error> {
        // Relations used to have a tree of their own; they are part of the ledger entry now.
        let _ = db.drop_tree("relations");
        Ok(Self {
            users: db.open_tree("users")?,
            ledger: db.open_tree("ledger")?,
            duplicates: db.open_tree("duplicates")?,
            describes: db.open_tree("describe")?,
            tenants: db.open_tree("tenants")?,
            db,
            user_ttl,
            negative_ttl,
            metrics,
            lookups: Arc::default(),
            recent_users: Arc::default(),
        })
    }

    /// Keeps `source` as the last tenant file of its name that loaded, compiled and started.
    pub fn tenant_put(&self, source: &TenantSource) {
        let entry = TenantEntry {
            text: source.text.clone(),
            stored_at: now_secs(),
        };
        let Ok(bytes) = serde_json::to_vec(&entry) else {
            return;
        };
        if let Err(error) = self.tenants.insert(source.file.as_bytes(), bytes) {
            tracing::warn!(%error, "tenant cache update failed");
        }
    }

    /// The last good tenant file named `file`, if one was kept.
    pub fn tenant_get(&self, file: &str) -> Option<TenantSource> {
        let entry = self
            .tenants
            .get(file.as_bytes())
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice::<TenantEntry>(&bytes).ok());
        self.metrics.cache("mapping", entry.is_some());
        entry.map(|e| TenantSource {
            file: file.to_owned(),
            text: e.text,
        })
    }

    /// The describe of `sobject` as the integration user sees it, `None` when the user cannot
    /// see the object. A cached copy is revalidated with `If-Modified-Since` (a 304 keeps it).
    ///
    /// # Errors
    /// The request's, and so [`SalesforceError::VersionNotOffered`] when the 404 came from an
    /// API version the org does not offer (the client tells it from an object the user cannot
    /// see), in which case the cached copy is kept.
    pub async fn describe(
        &self,
        client: &SalesforceClient,
        sobject: &str,
    ) -> Result<Option<SObjectDescribe>, SalesforceError> {
        let k = key(client.tenant(), sobject);
        let cached: Option<DescribeEntry> = self
            .describes
            .get(&k)
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        self.metrics.cache("describe", cached.is_some());
        let since = cached.as_ref().and_then(|c| c.last_modified.as_deref());
        match client.describe(sobject, since).await {
            Ok(Described::NotModified) => Ok(cached.map(|c| c.describe)),
            Ok(Described::Fresh {
                describe,
                last_modified,
            }) => {
                let entry = DescribeEntry {
                    describe: *describe,
                    last_modified,
                };
                if let Ok(bytes) = serde_json::to_vec(&entry)
                    && let Err(error) = self.describes.insert(&k, bytes)
                {
                    tracing::warn!(%error, "describe cache update failed");
                }
                Ok(Some(entry.describe))
            }
            Err(SalesforceError::Api { status: 404, .. }) => {
                let _ = self.describes.remove(&k);
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Writes pending changes to disk (on shutdown).
    pub fn flush(&self) {
        if let Err(error) = self.db.flush() {
            tracing::warn!(%error, "cache flush failed");
        }
    }

    /// The last version applied for a booking, if known.
    pub fn ledger_get(&self, tenant: &str, booking_id: &str) -> Option<LedgerEntry> {
        self.ledger_read(tenant, booking_id).entry
    }

    /// A booking's ledger entry, kept with the bytes it was read from for
    /// [`Caches::ledger_put_over`].
    pub fn ledger_read(&self, tenant: &str, booking_id: &str) -> LedgerRead {
        let stored = self.ledger.get(key(tenant, booking_id)).ok().flatten();
        let entry = stored
            .as_deref()
            .and_then(stored_entry)
            .map(|(entry, _)| entry);
        self.metrics.cache("ledger", entry.is_some());
        LedgerRead { entry, stored }
    }

    /// Records a written version, never lowering what is there.
    pub fn ledger_put(&self, tenant: &str, booking_id: &str, entry: &LedgerEntry) {
        if let Some(bytes) = ledger_bytes(entry) {
            self.ledger_update(&key(tenant, booking_id), entry.version, bytes);
        }
    }

    /// As [`Caches::ledger_put`], for the entry `read` found before the booking was written:
    /// replaced in one step while it is still what is stored (the common case, which spares a
    /// second read of it); when it changed meanwhile, as `ledger_put`.
    pub fn ledger_put_over(
        &self,
        tenant: &str,
        booking_id: &str,
        read: &LedgerRead,
        entry: &LedgerEntry,
    ) {
        let Some(bytes) = ledger_bytes(entry) else {
            return;
        };
        if read
            .entry
            .as_ref()
            .is_some_and(|read| read.version > entry.version)
        {
            return;
        }
        let k = key(tenant, booking_id);
        match self
            .ledger
            .compare_and_swap(&k, read.stored.as_deref(), Some(bytes.as_slice()))
        {
            Ok(Ok(())) => {}
            Ok(Err(_changed)) => self.ledger_update(&k, entry.version, bytes),
            Err(error) => tracing::warn!(%error, "ledger update failed"),
        }
    }

    /// Stores `bytes` (an entry of `version`) at `k` unless a newer version is there.
    fn ledger_update(&self, k: &[u8], version: u64, bytes: Vec<u8>) {
        let result = self.ledger.fetch_and_update(k, |old| {
            // An entry of another shape (an older release's) is a miss: overwritten.
            // So is one that does not decode (decoded here, on this rarer path, to tell).
            let keep_old = old
                .and_then(stored_entry)
                .is_some_and(|(stored, _)| stored.version > version);
            if keep_old {
                old.map(<[u8]>::to_vec)
            } else {
                Some(bytes.clone())
            }
        });
        if let Err(error) = result {
            tracing::warn!(%error, "ledger update failed");
        }
    }

    /// Removes ledger entries written before `cutoff` (Unix seconds), looking at no more than
    /// `limit` entries from `from` on, so a large ledger is expired a slice at a time. Returns
    /// how many were removed and where the next slice starts (`None`: the end was reached).
    pub fn ledger_expire(
        &self,
        cutoff: u64,
        from: Option<&[u8]>,
        limit: usize,
    ) -> (usize, Option<Vec<u8>>) {
        let entries = match from {
            Some(start) => self.ledger.range(start.to_vec()..),
            None => self.ledger.iter(),
        };
        let mut removed = 0;
        for (seen, item) in entries.enumerate() {
            let Ok((k, v)) = item else { break };
            if seen == limit {
                return (removed, Some(k.to_vec()));
            }
            // An entry that does not decode counts as written at 0: removed.
            let written_at = stored_entry(&v).map_or(0, |(_, at)| at);
            // Only if unchanged since read: a version written meanwhile stays.
            if written_at < cutoff
                && self
                    .ledger
                    .compare_and_swap(&k, Some(&v), None::<&[u8]>)
                    .is_ok_and(|swapped| swapped.is_ok())
            {
                removed += 1;
            }
        }
        (removed, None)
    }

    fn user_get(&self, tenant: &str, email: &str) -> Option<UserEntry> {
        let k = key(tenant, email);
        let now = now_secs();
        let recent = self
            .recent_users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&k)
            .cloned();
        let entry = match recent {
            Some(entry) => Some(entry),
            None => {
                let stored = self
                    .users
                    .get(&k)
                    .ok()
                    .flatten()
                    .and_then(|bytes| serde_json::from_slice::<UserEntry>(&bytes).ok());
                if let Some(entry) = &stored {
                    self.remember_user(k, entry.clone());
                }
                stored
            }
        }
        .filter(|e| e.expires_at > now);
        self.metrics.cache("user", entry.is_some());
        entry
    }

    fn remember_user(&self, k: Vec<u8>, entry: UserEntry) {
        let mut recent = self.recent_users.write().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= RECENT_USERS {
            recent.clear();
        }
        recent.insert(k, entry);
    }

    fn user_put(&self, tenant: &str, email: &str, user_id: Option<String>) {
        let ttl = if user_id.is_some() {
            self.user_ttl
        } else {
            self.negative_ttl
        };
        let entry = UserEntry {
            user_id,
            expires_at: now_secs() + ttl.as_secs(),
        };
        let k = key(tenant, email);
        if let Ok(bytes) = serde_json::to_vec(&entry)
            && let Err(error) = self.users.insert(k.clone(), bytes)
        {
            tracing::warn!(%error, "user cache update failed");
        }
        self.remember_user(k, entry);
    }
}

/// Escapes a value for a SOQL string literal.
pub fn soql_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The host's User Id (cached, negative answers too) and the integration user's id.
pub async fn enrich(
    event: &BookingEvent,
    client: &SalesforceClient,
    caches: &Caches,
) -> Result<Enrichment, SalesforceError> {
    let email = event.booking.host.email.to_lowercase();
    let host_user_id = match caches.user_get(&event.tenant, &email) {
        Some(entry) => entry.user_id,
        // Boxed: a miss is rare, and its future would otherwise be part of every message's.
        None => Box::pin(caches.lookup_user(client, &event.tenant, &email)).await?,
    };
    Ok(Enrichment {
        host_user_id,
        integration_user_id: client.integration_user_id().await?,
    })
}

impl Caches {
    /// Looks a host up in Salesforce, once per key however many callers miss together.
    async fn lookup_user(
        &self,
        client: &SalesforceClient,
        tenant: &str,
        email: &str,
    ) -> Result<Option<String>, SalesforceError> {
        let k = key(tenant, email);
        let lock = self
            .lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(k.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(entry) = self.user_get(tenant, email) {
            return Ok(entry.user_id);
        }
        let result = async {
            let soql = format!(
                "SELECT Id FROM User WHERE Email = {} AND IsActive = true LIMIT 1",
                soql_quote(email)
            );
            let rows = client.query(&soql).await?;
            let found = rows
                .first()
                .and_then(|row| row.get("Id"))
                .and_then(|id| id.as_str())
                .map(str::to_owned);
            self.user_put(tenant, email, found.clone());
            Ok(found)
        }
        .await;
        self.lookups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&k);
        result
    }
}

/// Removes ledger entries older than `ttl`, one bounded slice a minute, until `cancel`, so the
/// ledger on disk stops growing with every booking ever written and a large one never costs a
/// long pause.
pub async fn expire_ledger(
    caches: Caches,
    ttl: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    const SLICE: usize = 50_000;
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
            () = cancel.cancelled() => return,
        }
        let cutoff = SystemTime::now()
            .checked_sub(ttl)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let slice = caches.clone();
        let from = cursor.take();
        let Ok((removed, next)) = tokio::task::spawn_blocking(move || {
            slice.ledger_expire(cutoff, from.as_deref(), SLICE)
        })
        .await
        else {
            return;
        };
        if removed > 0 {
            tracing::info!(removed, "expired ledger entries");
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_cache_is_sized_by_memory_mb() {
        let config = CacheConfig {
            memory_mb: 7,
            ..CacheConfig::default()
        };
        assert_eq!(sled_config(&config).cache_capacity, 7 * 1024 * 1024);
    }

    fn test_config(dir: &std::path::Path) -> CacheConfig {
        CacheConfig {
            path: dir.to_path_buf(),
            user_ttl_secs: 60,
            negative_ttl_secs: 5,
            ..CacheConfig::default()
        }
    }

    #[test]
    fn a_corrupt_database_is_rebuilt() {
        let dir = std::env::temp_dir().join(format!("portals-crm-corrupt-{}", std::process::id()));
        let open = || Caches::open(&test_config(&dir), Arc::new(Metrics::new()));
        drop(open().unwrap());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::write(&path, b"\x00garbage, not sled\xff").unwrap();
            }
        }
        let caches = open().expect("rebuilt, not fatal");
        caches.ledger_put(
            "acme",
            "bk_1",
            &LedgerEntry {
                version: 1,
                record_ids: vec![],
                relations: None,
            },
        );
        assert_eq!(caches.ledger_get("acme", "bk_1").unwrap().version, 1);
        drop(caches);
        let _ = std::fs::remove_dir_all(&dir);
        let mut moved_aside = 0;
        for entry in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!(
                "portals-crm-corrupt-{}.corrupt-",
                std::process::id()
            )) {
                moved_aside += 1;
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        assert_eq!(moved_aside, 1, "the unreadable database was moved aside");
    }

    #[test]
    fn ledger_entries_expire_a_slice_at_a_time() {
        let dir = std::env::temp_dir().join(format!("portals-crm-expire-{}", std::process::id()));
        let caches = Caches::open(&test_config(&dir), Arc::new(Metrics::new())).unwrap();
        let entry = LedgerEntry {
            version: 1,
            record_ids: vec![("lead".into(), "00Q000000000001AAA".into())],
            relations: Some(vec![]),
        };
        for id in ["bk_1", "bk_2", "bk_3"] {
            caches.ledger_put("acme", id, &entry);
        }
        assert_eq!(
            caches.ledger_expire(0, None, 10),
            (0, None),
            "nothing is older"
        );
        assert_eq!(caches.ledger_get("acme", "bk_2"), Some(entry.clone()));
        let tomorrow = now_secs() + 86_400;
        let (removed, next) = caches.ledger_expire(tomorrow, None, 2);
        assert_eq!(removed, 2);
        let next = next.expect("one entry left to look at");
        assert_eq!(caches.ledger_expire(tomorrow, Some(&next), 2), (1, None));
        for id in ["bk_1", "bk_2", "bk_3"] {
            assert_eq!(caches.ledger_get("acme", id), None);
        }
        drop(caches);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_answers_are_served_from_memory_and_still_expire() {
        let dir = std::env::temp_dir().join(format!("portals-crm-users-{}", std::process::id()));
        let caches = Caches::open(&test_config(&dir), Arc::new(Metrics::new())).unwrap();
        caches.user_put("acme", "sara@x.example", Some("005000000000001AAA".into()));
        // Gone from sled: the answer comes from the in-memory front.
        caches.users.clear().unwrap();
        assert_eq!(
            caches.user_get("acme", "sara@x.example").unwrap().user_id,
            Some("005000000000001AAA".into())
        );
        // An expired answer is a miss wherever it is kept.
        caches.remember_user(
            key("acme", "old@x.example"),
            UserEntry {
                user_id: None,
                expires_at: now_secs() - 1,
            },
        );
        assert_eq!(caches.user_get("acme", "old@x.example"), None);
        // Read from sled once, then kept.
        caches
            .users
            .insert(
                key("acme", "ann@x.example"),
                serde_json::to_vec(&UserEntry {
                    user_id: Some("005000000000002AAA".into()),
                    expires_at: now_secs() + 60,
                })
                .unwrap(),
            )
            .unwrap();
        assert!(caches.user_get("acme", "ann@x.example").is_some());
        caches.users.clear().unwrap();
        assert!(caches.user_get("acme", "ann@x.example").is_some());
        drop(caches);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn opening_waits_for_a_previous_handle_to_let_go() {
        let dir = std::env::temp_dir().join(format!("portals-crm-lock-{}", std::process::id()));
        let first = Caches::open(&test_config(&dir), Arc::new(Metrics::new())).unwrap();
        let closing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let second = Caches::open(&test_config(&dir), Arc::new(Metrics::new()));
        closing.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());
        drop(second);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn soql_quoting_escapes_quotes_and_backslashes() {
        assert_eq!(soql_quote("o'brien@x.example"), "'o\\'brien@x.example'");
        assert_eq!(soql_quote("a\\b"), "'a\\\\b'");
    }

    #[test]
    fn the_previous_releases_json_entries_are_read_kept_above_and_expired() {
        let dir =
            std::env::temp_dir().join(format!("portals-crm-ledger-v1-{}", std::process::id()));
        let caches = Caches::open(&test_config(&dir), Arc::new(Metrics::new())).unwrap();
        // As the previous release wrote them: the version, big-endian, then the JSON.
        let json = |version: u64, written_at: u64| {
            let mut bytes = version.to_be_bytes().to_vec();
            bytes.extend_from_slice(
                format!(
                    r#"{{"version":{version},"record_ids":[["lead","00Q000000000001AAA"]],"relations":[{{"id":"0RE000000000001AAA","key":"ann@x.example","is_parent":false,"is_invitee":true,"relation_id":"00Q000000000001AAA"}}],"written_at":{written_at}}}"#
                )
                .as_bytes(),
            );
            bytes
        };
        caches
            .ledger
            .insert(key("acme", "bk_1"), json(5, now_secs()))
            .unwrap();
        let read = caches.ledger_read("acme", "bk_1");
        let entry = read.entry.clone().expect("a JSON entry is read");
        assert_eq!(entry.version, 5);
        assert_eq!(
            entry.record_ids,
            vec![("lead".into(), "00Q000000000001AAA".into())]
        );
        assert_eq!(entry.relations.as_ref().map(Vec::len), Some(1));
        // Never lowered by an older version, replaced by a newer one in the compact format.
        caches.ledger_put_over(
            "acme",
            "bk_1",
            &read,
            &LedgerEntry {
                version: 4,
                ..entry.clone()
            },
        );
        assert_eq!(caches.ledger_get("acme", "bk_1"), Some(entry.clone()));
        caches.ledger_put(
            "acme",
            "bk_1",
            &LedgerEntry {
                version: 6,
                ..entry.clone()
            },
        );
        let stored = caches.ledger.get(key("acme", "bk_1")).unwrap().unwrap();
        assert_eq!(stored_format(&stored), Some(StoredFormat::Compact));
        assert_eq!(caches.ledger_get("acme", "bk_1").unwrap().version, 6);
        // Both formats carry their time for expiry: only the old one is past the cutoff.
        caches
            .ledger
            .insert(key("acme", "bk_2"), json(1, 1_000))
            .unwrap();
        assert_eq!(caches.ledger_expire(now_secs() - 60, None, 10), (1, None));
        assert!(caches.ledger_get("acme", "bk_1").is_some());
        assert_eq!(caches.ledger_get("acme", "bk_2"), None);
        drop(caches);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_compact_entry_is_under_two_thirds_of_its_json_and_decodes_to_itself() {
        let entry = LedgerEntry {
            version: 3,
            record_ids: ["lead_0", "event", "booking", "rel_0"]
                .map(|r| (r.to_owned(), "00Q000000000123AAA".to_owned()))
                .to_vec(),
            relations: Some(vec![Existing {
                id: "0RE000000000123AAA".into(),
                key: "a12345@bench-1764700000.example".into(),
                is_parent: false,
                is_invitee: true,
                relation_id: "00Q000000000123AAA".into(),
            }]),
        };
        let bytes = ledger_bytes(&entry).unwrap();
        let (read, written_at) = stored_entry(&bytes).expect("it decodes");
        assert_eq!(read, entry);
        assert!(written_at >= now_secs() - 5);
        let json = serde_json::to_vec(&entry).unwrap().len() + VERSION_PREFIX;
        assert!(
            bytes.len() * 3 < json * 2,
            "{} bytes against {json}",
            bytes.len()
        );
        // Cut short, with bytes after it, or with a prefix that is not its version, it is a
        // miss, not a panic.
        for end in 0..bytes.len() {
            assert_eq!(stored_entry(&bytes[..end]), None, "{end} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(stored_entry(&longer), None);
        let mut other = bytes.clone();
        other[..VERSION_PREFIX].copy_from_slice(&4u64.to_be_bytes());
        assert_eq!(stored_entry(&other), None);
    }

    #[test]
    fn the_compact_layout_is_pinned() {
        // postcard's wire format, written out by hand: varints for lengths and integers, a
        // string as its length and bytes, `Some` as 1, a bool as 0 or 1. A change to the
        // fields of LedgerEntry or Existing fails here: it needs a new COMPACT byte.
        let entry = LedgerEntry {
            version: 300,
            record_ids: vec![("lead_0".into(), "00Q1".into())],
            relations: Some(vec![Existing {
                id: "0RE1".into(),
                key: "k".into(),
                is_parent: true,
                is_invitee: false,
                relation_id: "00Q1".into(),
            }]),
        };
        let mut expected = 300u64.to_be_bytes().to_vec();
        expected.push(COMPACT);
        expected.extend_from_slice(&1_764_700_000u64.to_be_bytes());
        expected.extend_from_slice(&[0xac, 0x02]); // version 300
        expected.push(1); // one record id
        expected.push(6);
        expected.extend_from_slice(b"lead_0");
        expected.push(4);
        expected.extend_from_slice(b"00Q1");
        expected.extend_from_slice(&[1, 1]); // Some, one relation
        expected.push(4);
        expected.extend_from_slice(b"0RE1");
        expected.push(1);
        expected.extend_from_slice(b"k");
        expected.extend_from_slice(&[1, 0]); // is_parent, is_invitee
        expected.push(4);
        expected.extend_from_slice(b"00Q1");
        assert_eq!(compact_bytes(&entry, 1_764_700_000), Some(expected.clone()));
        assert_eq!(stored_entry(&expected), Some((entry, 1_764_700_000)));
    }

    #[test]
    fn a_corrupt_entry_is_overwritten_and_expired() {
        let dir =
            std::env::temp_dir().join(format!("portals-crm-ledger-bad-{}", std::process::id()));
        let caches = Caches::open(&test_config(&dir), Arc::new(Metrics::new())).unwrap();
        // Says version u64::MAX and written in the far future, holds no entry.
        let mut junk = u64::MAX.to_be_bytes().to_vec();
        junk.push(COMPACT);
        junk.extend_from_slice(&u64::MAX.to_be_bytes());
        junk.extend_from_slice(&[0xff, 0xff, 0xff]);
        let entry = |version| LedgerEntry {
            version,
            record_ids: vec![],
            relations: None,
        };
        for (id, bytes) in [
            ("bk_1", junk.clone()),
            ("bk_2", junk.clone()),
            ("bk_3", junk),
        ] {
            caches.ledger.insert(key("acme", id), bytes).unwrap();
        }
        assert_eq!(caches.ledger_get("acme", "bk_1"), None);
        caches.ledger_put("acme", "bk_1", &entry(3));
        assert_eq!(caches.ledger_get("acme", "bk_1"), Some(entry(3)));
        let read = caches.ledger_read("acme", "bk_2");
        caches.ledger_put_over("acme", "bk_2", &read, &entry(2));
        assert_eq!(caches.ledger_get("acme", "bk_2"), Some(entry(2)));
        // The one left is removed by the next expiry pass, whatever its header says.
        assert_eq!(caches.ledger_expire(now_secs() - 60, None, 10), (1, None));
        assert!(caches.ledger.get(key("acme", "bk_3")).unwrap().is_none());
        drop(caches);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn ledger_never_goes_backwards_and_corrupt_entries_are_misses() {
        let dir = std::env::temp_dir().join(format!("portals-crm-ledger-{}", std::process::id()));
        let caches = Caches::open(&test_config(&dir), Arc::new(Metrics::new())).unwrap();
        let entry = |version| LedgerEntry {
            version,
            record_ids: vec![],
            relations: None,
        };
        caches.ledger_put("acme", "bk_1", &entry(3));
        caches.ledger_put("acme", "bk_1", &entry(2));
        assert_eq!(caches.ledger_get("acme", "bk_1").unwrap().version, 3);
        caches
            .ledger
            .insert(key("acme", "bk_2"), &b"not json"[..])
            .unwrap();
        assert_eq!(caches.ledger_get("acme", "bk_2"), None);
        caches.ledger_put("acme", "bk_2", &entry(1));
        assert_eq!(caches.ledger_get("acme", "bk_2").unwrap().version, 1);
        // An older release's entry (JSON without the version prefix) is a miss, overwritten.
        caches
            .ledger
            .insert(
                key("acme", "bk_3"),
                &br#"{"version":9,"record_ids":[],"written_at":1}"#[..],
            )
            .unwrap();
        assert_eq!(caches.ledger_get("acme", "bk_3"), None);
        caches.ledger_put("acme", "bk_3", &entry(2));
        assert_eq!(caches.ledger_get("acme", "bk_3").unwrap().version, 2);
        // The relations travel with the entry.
        let related = LedgerEntry {
            relations: Some(vec![Existing {
                id: "0RE000000000001AAA".into(),
                key: "acme:ann@x.example".into(),
                is_parent: true,
                is_invitee: true,
                relation_id: "00Q000000000001AAA".into(),
            }]),
            ..entry(4)
        };
        caches.ledger_put("acme", "bk_3", &related);
        assert_eq!(caches.ledger_get("acme", "bk_3"), Some(related.clone()));
        // Written over what was read, in one step; a newer version written meanwhile stays.
        let read = caches.ledger_read("acme", "bk_4");
        assert_eq!(read.entry, None);
        caches.ledger_put_over("acme", "bk_4", &read, &entry(1));
        let read = caches.ledger_read("acme", "bk_4");
        assert_eq!(read.entry.as_ref().map(|e| e.version), Some(1));
        caches.ledger_put("acme", "bk_4", &entry(3));
        caches.ledger_put_over("acme", "bk_4", &read, &entry(2));
        assert_eq!(caches.ledger_get("acme", "bk_4").unwrap().version, 3);
        let read = caches.ledger_read("acme", "bk_4");
        caches.ledger_put_over("acme", "bk_4", &read, &entry(2));
        assert_eq!(caches.ledger_get("acme", "bk_4").unwrap().version, 3);
        caches.ledger_put_over("acme", "bk_4", &read, &entry(4));
        assert_eq!(caches.ledger_get("acme", "bk_4").unwrap().version, 4);
        caches.forget_relations("acme", "bk_3");
        assert_eq!(
            caches.ledger_get("acme", "bk_3"),
            Some(LedgerEntry {
                relations: None,
                ..related
            })
        );
        caches.user_put("acme", "gone@x.example", None);
        assert_eq!(
            caches.user_get("acme", "gone@x.example").unwrap().user_id,
            None
        );
        drop(caches);
        let _ = std::fs::remove_dir_all(dir);
    }
}
