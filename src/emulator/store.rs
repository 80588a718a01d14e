//! Stored records, 18-character ids, and every write rule the emulated org enforces.

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::org::{
    DuplicateAction, FieldAccess, FieldSpec, OrgSpec, RecordAccess, SObjectSpec, UserSpec,
};
use crate::salesforce::model::ApiError;

/// One stored record: the sObject and its field values (canonical field names).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The sObject's API name.
    pub sobject: String,
    /// Field values, including `Id`.
    pub fields: Map<String, Value>,
}

/// The fields of a write: a request body's, and for an upsert by external id that field,
/// set to the URL's value when the upsert inserts or left out when it updates (upsert docs:
/// <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_upsert_patch.htm>).
/// Read in place: the body is not copied to add or drop the key.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// The request body.
    pub body: &'a Map<String, Value>,
    /// The external id field of an upsert, with its value when the upsert inserts.
    pub key: Option<(&'a String, Option<&'a Value>)>,
}

impl<'a> Fields<'a> {
    /// A body written as it is.
    pub fn of(body: &'a Map<String, Value>) -> Self {
        Self { body, key: None }
    }

    fn iter(self) -> impl Iterator<Item = (&'a String, &'a Value)> {
        let key = self.key;
        // Field names are case-insensitive (as every lookup of one here): a body's key field in
        // any case is the upsert's key, set from the URL or left out, never written from the body.
        let skip = key.map(|(name, _)| name);
        self.body
            .iter()
            .filter(move |(name, _)| skip.is_none_or(|key| !key.eq_ignore_ascii_case(name)))
            .chain(key.and_then(|(name, value)| Some((name, value?))))
    }
}

/// A write to undo when a transaction rolls back.
#[derive(Debug)]
enum Undo {
    Created(String),
    Replaced(String, Record),
    Deleted(String, Record),
    /// One field set on a record (id, field, the value it had): for a field no index holds.
    FieldSet(String, &'static str, Option<Value>),
}

/// All records of the org, with an index of external-id and unique values.
///
/// Its maps hash with FxHash, not SipHash: an emulator's keys come from its tests, so the
/// protection against chosen collisions buys nothing, and SipHash was a fifth of its CPU.
#[derive(Debug, Default)]
pub struct Store {
    records: FxHashMap<String, Record>,
    /// Creation order per sObject: O(log n) inserts and removals at any size.
    by_object: FxHashMap<String, BTreeMap<u64, String>>,
    /// (sObject, field, lower-cased value) → records, for external id and unique fields. A
    /// non-unique external id can match several records (an upsert then answers 300).
    key_index: FxHashMap<(String, String, String), Vec<String>>,
    /// Event id → its EventRelation ids, in the order they were indexed: the relation rules
    /// and the Who of an event look at its own relations, never at all of them.
    relations_by_event: FxHashMap<String, Vec<String>>,
    next_serial: u64,
    journal: Vec<Undo>,
    /// The last write's time in milliseconds and in the wire format: the records of one
    /// request are written within a few milliseconds, and formatting was a few percent of a
    /// write.
    stamp: (i128, String),
}

/// Salesforce's 18-character id: the 15-character case-sensitive id plus a 3-character suffix
/// that encodes which of its letters are upper case.
pub fn make_id(prefix: &str, serial: u64) -> String {
    let mut body = [b'0'; 10];
    let mut n = serial;
    for slot in body.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    let mut id = String::with_capacity(18);
    id.push_str(prefix);
    id.push_str("5g");
    id.extend(body.iter().map(|&c| char::from(c)));
    with_suffix(id)
}

/// The digits of an id's serial, after its key prefix and the `5g` of the emulator's pod.
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The creation serial [`make_id`] encoded in `id` (every id of a store is made by it), which
/// orders records by creation: read back from the id rather than kept in a map beside it.
fn serial(id: &str) -> u64 {
    id.as_bytes()
        .get(5..15)
        .unwrap_or_default()
        .iter()
        .map(|c| BASE62.iter().position(|d| d == c).unwrap_or_default() as u64)
        .fold(0, |n, digit| n * 62 + digit)
}

/// Appends the case-safe suffix to a 15-character id.
pub fn id15_to_18(id15: &str) -> String {
    with_suffix(id15.to_owned())
}

/// `id15` with its case-safe suffix appended.
fn with_suffix(mut id15: String) -> String {
    const SUFFIX: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    let mut suffix = [0u8; 3];
    let mut len = 0;
    for (slot, chunk) in suffix.iter_mut().zip(id15.as_bytes().chunks(5)) {
        len += 1;
        let bits = chunk
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_ascii_uppercase())
            .fold(0usize, |acc, (i, _)| acc | (1 << i));
        *slot = SUFFIX[bits];
    }
    id15.extend(suffix[..len].iter().map(|&c| char::from(c)));
    id15
}

/// True for a well-formed 15- or 18-character id (the suffix checked on 18).
pub fn is_valid_id(id: &str) -> bool {
    let well_formed = id.bytes().all(|c| c.is_ascii_alphanumeric());
    match id.len() {
        15 => well_formed,
        18 => well_formed && id15_to_18(&id[..15]) == id,
        _ => false,
    }
}

/// Salesforce's wire format for datetimes, `2026-12-03T12:00:00.000+0000` (in UTC).
const WIRE_DATETIME: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]+0000"
);

/// `at` in Salesforce's wire format for datetimes ([`WIRE_DATETIME`]); every record written
/// carries a few (`CreatedDate`, `LastModifiedDate`, its own dateTime fields). Written as the
/// product's canonical form with Salesforce's offset (the format description interprets its
/// items on every call); a year before 0000 in UTC, which has no canonical form, through the
/// description.
pub fn format_datetime(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    if at.year() < 0 {
        // Cannot fail: every component is in an OffsetDateTime.
        return at.format(WIRE_DATETIME).unwrap_or_default();
    }
    let mut text = crate::event::timestamp::canonical(at);
    text.truncate("2026-12-03T12:00:00.000".len());
    text.push_str("+0000");
    text
}

/// A dateTime as Salesforce reads it: ISO 8601 `yyyy-MM-ddTHH:mm:ss[.SSS]` with `Z` or an
/// offset (<https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/intro_valid_date_formats.htm>).
/// `time`'s RFC 3339 reader takes any character between date and time; Salesforce takes only
/// `T` and answers anything else (`2026-12-01 14:00:00Z`) with `JSON_PARSER_ERROR`.
fn parse_datetime(text: &str) -> Option<OffsetDateTime> {
    if text.as_bytes().get(10) != Some(&b'T') {
        return None;
    }
    // Salesforce also writes `+0000` offsets without a colon (its own wire format, which the
    // worker sends too): read as RFC 3339 with the colon put in, so that both spellings accept
    // exactly the same instants (offset hours 00–23, a leap second).
    let split = text.len().checked_sub(5)?;
    let offset = text.get(split..)?;
    if offset.starts_with(['+', '-']) && offset[1..].bytes().all(|b| b.is_ascii_digit()) {
        let mut with_colon = String::with_capacity(text.len() + 1);
        with_colon.push_str(&text[..split + 3]);
        with_colon.push(':');
        with_colon.push_str(&text[split + 3..]);
        OffsetDateTime::parse(&with_colon, &Rfc3339).ok()
    } else {
        OffsetDateTime::parse(text, &Rfc3339).ok()
    }
}

/// A boolean field of a record (absent is false).
fn flag(record: &Record, field: &str) -> bool {
    record.fields.get(field) == Some(&Value::Bool(true))
}

/// The event of an EventRelation record.
fn relation_event(record: &Record) -> Option<String> {
    (record.sobject == "EventRelation")
        .then(|| {
            record
                .fields
                .get("EventId")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .flatten()
}

/// EventRelation's defaults on create: the flags false, except `IsInvitee`, true when none of
/// the three is given (O-er); only the flags the org has (`IsParent` and `IsWhat` come with
/// Shared Activities).
fn relation_defaults(object: &SObjectSpec, fields: &mut Map<String, Value>) {
    let given = ["IsInvitee", "IsParent", "IsWhat"]
        .iter()
        .any(|f| fields.get(*f).is_some_and(|v| !v.is_null()));
    for name in ["IsInvitee", "IsParent", "IsWhat"] {
        if !object.fields.iter().any(|f| f.name == name) {
            continue;
        }
        let default = name == "IsInvitee" && !given;
        let entry = fields.entry(name).or_insert(Value::Bool(default));
        if entry.is_null() {
            *entry = Value::Bool(default);
        }
    }
}

fn err(code: &str, message: impl Into<String>, fields: &[&str]) -> ApiError {
    ApiError::new(
        code,
        message,
        fields.iter().map(|f| (*f).to_owned()).collect(),
    )
}

fn is_text(field_type: &str) -> bool {
    matches!(
        field_type,
        "string" | "textarea" | "email" | "phone" | "url" | "picklist" | "combobox"
    )
}

/// An address an Email field takes: `local@domain.tld`, no spaces; non-ASCII characters only
/// with Email Address Internationalization on (`internationalized`).
fn looks_like_email(value: &str, internationalized: bool) -> bool {
    let Some((local, domain)) = value.split_once('@') else {
        return false;
    };
    (internationalized || value.is_ascii())
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !value.contains(char::is_whitespace)
        && !domain.contains('@')
}

/// The user and org a write runs as.
pub struct Ctx<'a> {
    /// The org model.
    pub org: &'a OrgSpec,
    /// The running user.
    pub user: &'a UserSpec,
    /// The running user's record id.
    pub user_id: &'a str,
    /// Now, for CreatedDate / LastModifiedDate.
    pub now: OffsetDateTime,
    /// The request carried `Sforce-Duplicate-Rule-Header: allowSave=true`.
    pub allow_save: bool,
    /// The REST API version of a save, for the record URLs of its answer (none on reads).
    pub version: Option<&'a str>,
}

impl Ctx<'_> {
    /// What the running user may do with `record` (see [`OrgSpec::record_access`]).
    pub fn record_access(&self, record: &Record) -> RecordAccess {
        let Some(object) = self.org.sobject(&record.sobject) else {
            return RecordAccess::None;
        };
        let owner = record.fields.get("OwnerId").and_then(Value::as_str);
        self.org
            .record_access(self.user, self.user_id, object, owner)
    }
}

/// The error of a write to a record the user may not edit (no Edit on the object, or a record
/// shared read-only), as Salesforce words it (`StatusCode` in
/// <https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_calls_concepts_core_data_objects.htm>).
fn read_only() -> ApiError {
    err(
        "INSUFFICIENT_ACCESS_OR_READONLY",
        "insufficient access rights on object id",
        &[],
    )
}

impl Store {
    /// A store holding one `User` record per user of the org; returns the username → id map.
    pub fn with_users(org: &OrgSpec) -> (Self, HashMap<String, String>) {
        let mut store = Self::default();
        let mut ids = HashMap::new();
        let prefix = org
            .sobject("User")
            .map(|o| o.key_prefix.clone())
            .unwrap_or_else(|| "005".into());
        for user in &org.users {
            let id = store.allocate(&prefix);
            let mut fields = Map::new();
            fields.insert("Id".into(), Value::String(id.clone()));
            fields.insert("Username".into(), user.username.clone().into());
            fields.insert("Email".into(), user.email.clone().into());
            fields.insert("FirstName".into(), user.first_name.clone().into());
            fields.insert("LastName".into(), user.last_name.clone().into());
            fields.insert("IsActive".into(), user.active.into());
            store.insert_raw(
                id.clone(),
                Record {
                    sobject: "User".into(),
                    fields,
                },
                org,
            );
            ids.insert(user.username.to_ascii_lowercase(), id);
        }
        // The org's duplicate rules as the setup object `DuplicateRule` reads them (SOQL),
        // when the org file declares that object.
        if let Some(prefix) = org.sobject("DuplicateRule").map(|o| o.key_prefix.clone()) {
            for rule in &org.duplicate_rules {
                let id = store.allocate(&prefix);
                let mut fields = Map::new();
                fields.insert("Id".into(), Value::String(id.clone()));
                fields.insert("DeveloperName".into(), rule.name.clone().into());
                fields.insert(
                    "MasterLabel".into(),
                    rule.label
                        .clone()
                        .unwrap_or_else(|| rule.name.clone())
                        .into(),
                );
                fields.insert("SobjectType".into(), rule.sobject.clone().into());
                fields.insert("IsActive".into(), rule.active.into());
                store.insert_raw(
                    id,
                    Record {
                        sobject: "DuplicateRule".into(),
                        fields,
                    },
                    org,
                );
            }
        }
        store.journal.clear();
        (store, ids)
    }

    /// `at` in the wire format ([`format_datetime`]), formatted once per millisecond.
    fn wire_time(&mut self, at: OffsetDateTime) -> String {
        let ms = at.unix_timestamp_nanos() / 1_000_000;
        if self.stamp.0 != ms || self.stamp.1.is_empty() {
            self.stamp = (ms, format_datetime(at));
        }
        self.stamp.1.clone()
    }

    fn allocate(&mut self, prefix: &str) -> String {
        self.next_serial += 1;
        make_id(prefix, self.next_serial)
    }

    /// The record with this id.
    pub fn get(&self, id: &str) -> Option<&Record> {
        let id = if id.len() == 15 {
            id15_to_18(id)
        } else {
            id.to_owned()
        };
        self.records.get(&id)
    }

    /// How many records an sObject has.
    pub fn count(&self, sobject: &str) -> usize {
        self.by_object.get(sobject).map_or(0, BTreeMap::len)
    }

    /// Every record of an sObject, in creation order.
    pub fn all(&self, sobject: &str) -> Vec<&Record> {
        self.by_object
            .get(sobject)
            .map(|ids| ids.values().filter_map(|id| self.records.get(id)).collect())
            .unwrap_or_default()
    }

    /// Records whose external id `field` equals `value` (case-insensitive, as Salesforce matches
    /// text external ids).
    pub fn find_by_external_id(&self, sobject: &str, field: &str, value: &str) -> Vec<String> {
        let key = (
            sobject.to_owned(),
            field.to_ascii_lowercase(),
            value.to_lowercase(),
        );
        self.key_index.get(&key).cloned().unwrap_or_default()
    }

    /// Starts a transaction; pass the mark to [`Store::rollback`] to undo what follows.
    pub fn mark(&self) -> usize {
        self.journal.len()
    }

    /// Undoes every write after `mark`.
    pub fn rollback(&mut self, mark: usize, org: &OrgSpec) {
        while self.journal.len() > mark {
            match self.journal.pop() {
                Some(Undo::Created(id)) => self.remove_raw(&id, org),
                Some(Undo::Replaced(id, old)) => {
                    self.replace_raw(&id, old, org);
                }
                Some(Undo::Deleted(id, old)) => self.insert_raw(id, old, org),
                Some(Undo::FieldSet(id, field, old)) => {
                    if let Some(record) = self.records.get_mut(&id) {
                        match old {
                            Some(value) => record.fields.insert(field.into(), value),
                            None => record.fields.remove(field),
                        };
                    }
                }
                None => break,
            }
        }
    }

    /// Forgets the undo log up to now: the writes are committed.
    pub fn commit(&mut self) {
        self.journal.clear();
    }

    /// The index keys of a record, each with whether its field is unique.
    fn index_keys(
        record: &Record,
        object: Option<&SObjectSpec>,
    ) -> Vec<((String, String, String), bool)> {
        let Some(object) = object else {
            return vec![];
        };
        object
            .fields
            .iter()
            .filter(|f| f.external_id || f.unique)
            .filter_map(|f| {
                let value = record.fields.get(&f.name)?;
                let text = match value {
                    Value::String(s) => s.to_lowercase(),
                    Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                Some((
                    (object.name.clone(), f.name.to_ascii_lowercase(), text),
                    f.unique,
                ))
            })
            .collect()
    }

    fn insert_raw(&mut self, id: String, record: Record, org: &OrgSpec) {
        self.index(&id, &record, org);
        self.by_object
            .entry(record.sobject.clone())
            .or_default()
            .insert(serial(&id), id.clone());
        self.records.insert(id, record);
    }

    fn index(&mut self, id: &str, record: &Record, org: &OrgSpec) {
        for (key, _) in Self::index_keys(record, org.sobject(&record.sobject)) {
            let ids = self.key_index.entry(key).or_default();
            if !ids.iter().any(|x| x == id) {
                ids.push(id.to_owned());
            }
        }
        if let Some(event_id) = relation_event(record) {
            let ids = self.relations_by_event.entry(event_id).or_default();
            if !ids.iter().any(|x| x == id) {
                ids.push(id.to_owned());
            }
        }
    }

    fn unindex(&mut self, id: &str, record: &Record, org: &OrgSpec) {
        if let Some(event_id) = relation_event(record)
            && let Some(ids) = self.relations_by_event.get_mut(&event_id)
        {
            ids.retain(|x| x != id);
            if ids.is_empty() {
                self.relations_by_event.remove(&event_id);
            }
        }
        for (key, _) in Self::index_keys(record, org.sobject(&record.sobject)) {
            if let Some(ids) = self.key_index.get_mut(&key) {
                ids.retain(|x| x != id);
                if ids.is_empty() {
                    self.key_index.remove(&key);
                }
            }
        }
    }

    fn remove_raw(&mut self, id: &str, org: &OrgSpec) {
        if let Some(record) = self.records.remove(id) {
            self.unindex(id, &record, org);
            if let Some(ids) = self.by_object.get_mut(&record.sobject) {
                ids.remove(&serial(id));
            }
        }
    }

    /// Swaps a record's fields in place (same id, same creation order), re-indexing its keys.
    /// Returns the record replaced.
    fn replace_raw(&mut self, id: &str, record: Record, org: &OrgSpec) -> Option<Record> {
        let old = self.records.remove(id);
        if let Some(old) = &old {
            self.unindex(id, old, org);
        }
        self.index(id, &record, org);
        self.records.insert(id.to_owned(), record);
        old
    }

    /// Creates a record, enforcing object and field permissions, types, lengths, required
    /// fields, uniqueness and the org's rules. Returns the new id.
    pub fn create(
        &mut self,
        ctx: &Ctx<'_>,
        object: &SObjectSpec,
        body: Fields<'_>,
    ) -> Result<String, Vec<ApiError>> {
        if !ctx.org.object_access(ctx.user, &object.name).create {
            return Err(vec![err(
                "INSUFFICIENT_ACCESS_OR_READONLY",
                format!(
                    "insufficient access rights on object: cannot create {}",
                    object.name
                ),
                &[],
            )]);
        }
        let mut fields = self.validate_fields(ctx, object, body, true)?;
        let missing: Vec<&str> = object
            .fields
            .iter()
            .filter(|f| f.createable && !f.nillable && !f.defaulted_on_create)
            .filter(|f| fields.get(&f.name).is_none_or(Value::is_null))
            .map(|f| f.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(vec![err(
                "REQUIRED_FIELD_MISSING",
                format!("Required fields are missing: [{}]", missing.join(", ")),
                &missing,
            )]);
        }
        for field in &object.fields {
            if field.name == "OwnerId" && fields.get("OwnerId").is_none_or(Value::is_null) {
                fields.insert("OwnerId".into(), ctx.user_id.into());
            }
            if field.name == "Status"
                && field.defaulted_on_create
                && fields.get("Status").is_none_or(Value::is_null)
                && let Some(first) = field.picklist.first()
            {
                fields.insert("Status".into(), first.clone().into());
            }
        }
        if object.name == "EventRelation" {
            relation_defaults(object, &mut fields);
        }
        let record = Record {
            sobject: object.name.clone(),
            fields,
        };
        self.check_record_rules(ctx, object, &record, None)?;
        self.check_unique(object, &record, None)?;
        self.check_duplicates(ctx, object, &record, None)?;
        let id = self.allocate(&object.key_prefix);
        let mut record = record;
        let now = self.wire_time(ctx.now);
        record.fields.insert("Id".into(), id.clone().into());
        record
            .fields
            .insert("CreatedDate".into(), now.clone().into());
        record.fields.insert("LastModifiedDate".into(), now.into());
        record
            .fields
            .insert("CreatedById".into(), ctx.user_id.into());
        record
            .fields
            .insert("LastModifiedById".into(), ctx.user_id.into());
        let event_id = relation_event(&record);
        self.insert_raw(id.clone(), record, ctx.org);
        self.journal.push(Undo::Created(id.clone()));
        if let Some(event_id) = event_id {
            self.sync_who(&event_id, ctx.org);
        }
        Ok(id)
    }

    /// Updates a record with the same rules as [`Store::create`], plus the validation rules.
    pub fn update(
        &mut self,
        ctx: &Ctx<'_>,
        object: &SObjectSpec,
        id: &str,
        body: Fields<'_>,
    ) -> Result<(), Vec<ApiError>> {
        if !ctx.org.object_access(ctx.user, &object.name).edit {
            return Err(vec![read_only()]);
        }
        let old = self
            .records
            .get(id)
            .ok_or_else(|| vec![err("ENTITY_IS_DELETED", "entity is deleted", &[])])?;
        if ctx.record_access(old) < RecordAccess::Edit {
            return Err(vec![read_only()]);
        }
        let changes = self.validate_fields(ctx, object, body, false)?;
        let mut record = old.clone();
        for (name, value) in changes {
            record.fields.insert(name, value);
        }
        for field in object.fields.iter().filter(|f| !f.nillable) {
            if record.fields.get(&field.name).is_some_and(Value::is_null) {
                return Err(vec![err(
                    "REQUIRED_FIELD_MISSING",
                    format!("Required fields are missing: [{}]", field.name),
                    &[&field.name],
                )]);
            }
        }
        self.check_record_rules(ctx, object, &record, Some(old))?;
        self.check_unique(object, &record, Some(id))?;
        self.check_duplicates(ctx, object, &record, Some(id))?;
        record
            .fields
            .insert("LastModifiedDate".into(), self.wire_time(ctx.now).into());
        record
            .fields
            .insert("LastModifiedById".into(), ctx.user_id.into());
        let event_id = relation_event(&record);
        if let Some(old) = self.replace_raw(id, record, ctx.org) {
            self.journal.push(Undo::Replaced(id.to_owned(), old));
        }
        if let Some(event_id) = event_id {
            self.sync_who(&event_id, ctx.org);
        }
        Ok(())
    }

    /// Deletes a record.
    pub fn delete(
        &mut self,
        ctx: &Ctx<'_>,
        object: &SObjectSpec,
        id: &str,
    ) -> Result<(), Vec<ApiError>> {
        if !ctx.org.object_access(ctx.user, &object.name).delete {
            return Err(vec![read_only()]);
        }
        let old = self
            .records
            .get(id)
            .cloned()
            .ok_or_else(|| vec![err("ENTITY_IS_DELETED", "entity is deleted", &[])])?;
        // Salesforce lets only the owner (or Modify All) delete; edit access is the
        // emulator's simplification, so a Public Read/Write org can still cancel bookings.
        if ctx.record_access(&old) < RecordAccess::Edit {
            return Err(vec![read_only()]);
        }
        // An event's relations are deleted with it (EventRelation, O-er).
        if old.sobject == "Event" {
            let relations: Vec<String> = self
                .relations_of(id)
                .map(|(relation_id, _)| relation_id.to_owned())
                .collect();
            for relation_id in relations {
                if let Some(relation) = self.records.get(&relation_id).cloned() {
                    self.remove_raw(&relation_id, ctx.org);
                    self.journal.push(Undo::Deleted(relation_id, relation));
                }
            }
        }
        let event_id = relation_event(&old);
        self.remove_raw(id, ctx.org);
        self.journal.push(Undo::Deleted(id.to_owned(), old));
        if let Some(event_id) = event_id {
            self.sync_who(&event_id, ctx.org);
        }
        Ok(())
    }

    /// The EventRelation records of an event: (id, record).
    fn relations_of<'a>(
        &'a self,
        event_id: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Record)> {
        let mut ids: Vec<&'a String> = self
            .relations_by_event
            .get(event_id)
            .into_iter()
            .flatten()
            .collect();
        // Creation order, as a query over all relations would list them.
        ids.sort_by_key(|id| serial(id));
        ids.into_iter()
            .filter_map(|id| self.records.get(id).map(|r| (id.as_str(), r)))
    }

    /// Keeps the event's `WhoId` equal to its (first) parent relation: with Shared Activities
    /// the Who is the relation with `IsParent`, and deleting it clears or promotes the Who
    /// (EventRelation, O-er). Without it relations are invitees only and the Who is the
    /// Event's own field, which they leave as it is.
    fn sync_who(&mut self, event_id: &str, org: &OrgSpec) {
        if !org.org.shared_activities {
            return;
        }
        let who = self
            .relations_of(event_id)
            .find(|(_, r)| flag(r, "IsParent"))
            .and_then(|(_, r)| r.fields.get("RelationId").cloned())
            .unwrap_or(Value::Null);
        let Some(event) = self.records.get_mut(event_id) else {
            return;
        };
        if event.fields.get("WhoId").unwrap_or(&Value::Null) == &who {
            return;
        }
        // Set in place: WhoId is a lookup, never an external id or unique field, so no index
        // holds it and the record need not be copied and re-indexed.
        let old = event.fields.insert("WhoId".into(), who);
        self.journal
            .push(Undo::FieldSet(event_id.to_owned(), "WhoId", old));
    }

    /// EventRelation's rules (O-er): one relation per person and event (a person who is both
    /// invitee and parent has one relation with both flags), one lead or up to 50 contacts as
    /// parents, up to 1,000 invitees. Salesforce documents the limits, not the error bodies:
    /// these follow the shapes of its duplicate and integrity errors.
    fn check_relation(&self, record: &Record, own_id: Option<&str>) -> Result<(), Vec<ApiError>> {
        let event_id = record
            .fields
            .get("EventId")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let person = record.fields.get("RelationId").and_then(Value::as_str);
        let others: Vec<&Record> = self
            .relations_of(event_id)
            .filter(|(id, _)| Some(*id) != own_id)
            .map(|(_, r)| r)
            .collect();
        if let Some((other, _)) = self
            .relations_of(event_id)
            .filter(|(id, _)| Some(*id) != own_id)
            .find(|(_, r)| r.fields.get("RelationId").and_then(Value::as_str) == person)
        {
            return Err(vec![err(
                "DUPLICATE_VALUE",
                format!(
                    "duplicate value found: RelationId duplicates value on record with id: {other}"
                ),
                &[],
            )]);
        }
        let type_of = |r: &Record| {
            r.fields
                .get("RelationId")
                .and_then(Value::as_str)
                .and_then(|id| self.records.get(id))
                .map(|t| t.sobject.clone())
                .unwrap_or_default()
        };
        if flag(record, "IsParent") {
            let parents: Vec<String> = others
                .iter()
                .filter(|r| flag(r, "IsParent"))
                .map(|r| type_of(r))
                .collect();
            let kind = type_of(record);
            let too_many = if kind == "Lead" || parents.iter().any(|k| k == "Lead") {
                !parents.is_empty()
            } else {
                parents.len() >= 50
            };
            if too_many {
                return Err(vec![err(
                    "FIELD_INTEGRITY_EXCEPTION",
                    "Relation ID: An event can be related to one lead or up to 50 contacts",
                    &["RelationId"],
                )]);
            }
        }
        if flag(record, "IsInvitee")
            && others.iter().filter(|r| flag(r, "IsInvitee")).count() >= 1000
        {
            return Err(vec![err(
                "FIELD_INTEGRITY_EXCEPTION",
                "Relation ID: An event can have up to 1,000 invitees",
                &["RelationId"],
            )]);
        }
        Ok(())
    }

    /// Checks each field of a write body; returns the values to store, coerced to their type.
    fn validate_fields(
        &self,
        ctx: &Ctx<'_>,
        object: &SObjectSpec,
        body: Fields<'_>,
        creating: bool,
    ) -> Result<Map<String, Value>, Vec<ApiError>> {
        let mut out = Map::new();
        let mut errors = Vec::new();
        let readable = ctx.org.object_access(ctx.user, &object.name).read;
        for (name, value) in body.iter() {
            if name == "attributes" {
                continue;
            }
            if let Some((system, _, _)) = super::org::SYSTEM_FIELDS
                .iter()
                .find(|(f, _, _)| f.eq_ignore_ascii_case(name))
            {
                errors.push(err(
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    format!("Unable to create/update fields: {system}. Please check the security settings of this field and verify that it is read/write for your profile or permission set."),
                    &[system],
                ));
                continue;
            }
            let Some((field, access)) = object
                .fields
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
                .map(|f| {
                    let access = if readable {
                        ctx.org.field_level_access(ctx.user, &object.name, f)
                    } else {
                        FieldAccess::None
                    };
                    (f, access)
                })
                .filter(|(_, access)| *access != FieldAccess::None)
            else {
                errors.push(err(
                    "INVALID_FIELD",
                    format!("No such column '{name}' on sobject of type {}", object.name),
                    &[],
                ));
                continue;
            };
            let writable = if creating {
                field.createable
            } else {
                field.updateable
            };
            if !writable || access != FieldAccess::Edit {
                errors.push(err(
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    format!(
                        "Unable to create/update fields: {}. Please check the security settings \
                         of this field and verify that it is read/write for your profile or \
                         permission set.",
                        field.name
                    ),
                    &[&field.name],
                ));
                continue;
            }
            match self.coerce(ctx, field, value) {
                Ok(v) => {
                    out.insert(field.name.clone(), v);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    fn coerce(&self, ctx: &Ctx<'_>, field: &FieldSpec, value: &Value) -> Result<Value, ApiError> {
        let name = field.name.as_str();
        if value.is_null() {
            return if field.nillable {
                Ok(Value::Null)
            } else {
                Err(err(
                    "REQUIRED_FIELD_MISSING",
                    format!("Required fields are missing: [{name}]"),
                    &[name],
                ))
            };
        }
        let parse_error = || {
            err(
                "JSON_PARSER_ERROR",
                format!(
                    "Cannot deserialize instance of {} from {} value {} or request may be missing \
                     a required field",
                    field.field_type,
                    if value.is_string() {
                        "VALUE_STRING"
                    } else {
                        "VALUE"
                    },
                    value
                ),
                &[],
            )
        };
        match field.field_type.as_str() {
            t if is_text(t) => {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(parse_error()),
                };
                if field.length > 0 && text.chars().count() > field.length as usize {
                    let shown: String = text.chars().take(40).collect();
                    return Err(err(
                        "STRING_TOO_LONG",
                        format!(
                            "{}: data value too large: {shown} (max length={})",
                            field.label, field.length
                        ),
                        &[name],
                    ));
                }
                if t == "email"
                    && !text.is_empty()
                    && !looks_like_email(&text, ctx.org.org.email_address_internationalization)
                {
                    return Err(err(
                        "INVALID_EMAIL_ADDRESS",
                        format!("{}: invalid email address: {text}", field.label),
                        &[name],
                    ));
                }
                if t == "picklist" && field.restricted && !field.picklist.contains(&text) {
                    return Err(err(
                        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                        format!(
                            "{}: bad value for restricted picklist field: {text}",
                            field.label
                        ),
                        &[name],
                    ));
                }
                Ok(Value::String(text))
            }
            "datetime" => value
                .as_str()
                .and_then(parse_datetime)
                .map(|at| Value::String(format_datetime(at)))
                .ok_or_else(parse_error),
            "double" | "currency" | "percent" => match value {
                Value::Number(n) => Ok(Value::Number(n.clone())),
                Value::String(s) => s
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(parse_error),
                _ => Err(parse_error()),
            },
            "int" => match value {
                Value::Number(n) if n.is_i64() => Ok(Value::Number(n.clone())),
                Value::String(s) => s
                    .parse::<i64>()
                    .map(|n| Value::Number(n.into()))
                    .map_err(|_| parse_error()),
                _ => Err(parse_error()),
            },
            "boolean" => value.as_bool().map(Value::Bool).ok_or_else(parse_error),
            "reference" => {
                let id = value.as_str().ok_or_else(parse_error)?;
                let wrong_type = || {
                    err(
                        "MALFORMED_ID",
                        format!("{}: id value of incorrect type: {id}", field.label),
                        &[name],
                    )
                };
                if !is_valid_id(id) {
                    return Err(wrong_type());
                }
                let full = if id.len() == 15 {
                    id15_to_18(id)
                } else {
                    id.to_owned()
                };
                match self.records.get(&full) {
                    Some(target)
                        if field
                            .reference_to
                            .iter()
                            .any(|t| t.eq_ignore_ascii_case(&target.sobject)) =>
                    {
                        // A lookup to a record the user cannot see: Salesforce names the
                        // record by its 15-character id and no field.
                        if ctx.record_access(target) == RecordAccess::None {
                            return Err(err(
                                "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY",
                                format!(
                                    "insufficient access rights on cross-reference id: {}",
                                    &full[..15]
                                ),
                                &[],
                            ));
                        }
                        if target.sobject == "User"
                            && target.fields.get("IsActive") == Some(&Value::Bool(false))
                        {
                            return Err(err(
                                "INACTIVE_OWNER_OR_USER",
                                "operation performed with inactive user",
                                &[name],
                            ));
                        }
                        Ok(Value::String(full))
                    }
                    Some(_) => Err(wrong_type()),
                    None => Err(err(
                        "INVALID_CROSS_REFERENCE_KEY",
                        format!("invalid cross reference id: {id}"),
                        &[name],
                    )),
                }
            }
            _ => Ok(value.clone()),
        }
    }

    /// Object-specific rules: Event dates and Who/What, and the org's validation rules.
    fn check_record_rules(
        &self,
        ctx: &Ctx<'_>,
        object: &SObjectSpec,
        record: &Record,
        old: Option<&Record>,
    ) -> Result<(), Vec<ApiError>> {
        if object.name == "EventRelation" {
            let own_id = old.and_then(|o| o.fields.get("Id")).and_then(Value::as_str);
            self.check_relation(record, own_id)?;
        }
        if object.name == "Event" {
            let start = record.fields.get("StartDateTime").and_then(Value::as_str);
            let end = record.fields.get("EndDateTime").and_then(Value::as_str);
            let duration = record
                .fields
                .get("DurationInMinutes")
                .filter(|v| !v.is_null());
            if start.is_some() && end.is_none() && duration.is_none() {
                return Err(vec![err(
                    "REQUIRED_FIELD_MISSING",
                    "Required fields are missing: [EndDateTime]",
                    &["EndDateTime"],
                )]);
            }
            if let (Some(start), Some(end)) =
                (start.and_then(parse_datetime), end.and_then(parse_datetime))
                && end < start
            {
                return Err(vec![err(
                    "FIELD_INTEGRITY_EXCEPTION",
                    "End Date Time: End time can't be before the start time",
                    &["EndDateTime"],
                )]);
            }
            let minutes = match (start.and_then(parse_datetime), end.and_then(parse_datetime)) {
                (Some(start), Some(end)) => Some((end - start).whole_minutes()),
                _ => duration.and_then(Value::as_i64),
            };
            let max = ctx.org.org.max_event_minutes();
            if let Some(minutes) = minutes
                && minutes > max
            {
                return Err(vec![err(
                    "FIELD_INTEGRITY_EXCEPTION",
                    format!("Duration must be between 0 and {max} minutes: Duration"),
                    &["DurationInMinutes"],
                )]);
            }
            let who_is_lead = record
                .fields
                .get("WhoId")
                .and_then(Value::as_str)
                .and_then(|id| self.records.get(id))
                .is_some_and(|r| r.sobject == "Lead");
            let has_what = record.fields.get("WhatId").is_some_and(|v| !v.is_null());
            if who_is_lead && has_what {
                return Err(vec![err(
                    "FIELD_INTEGRITY_EXCEPTION",
                    "Related To ID: If the Name ID refers to a lead, Related To ID must be empty",
                    &["WhatId"],
                )]);
            }
        }
        let Some(old) = old else {
            return Ok(());
        };
        for rule in ctx
            .org
            .validation_rules
            .iter()
            .filter(|r| r.sobject.eq_ignore_ascii_case(&object.name))
        {
            let before = old.fields.get(&rule.no_decrease).and_then(Value::as_f64);
            let after = record.fields.get(&rule.no_decrease).and_then(Value::as_f64);
            if let (Some(before), Some(after)) = (before, after)
                && after < before
            {
                return Err(vec![err(
                    "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                    rule.error_message.clone(),
                    &[],
                )]);
            }
        }
        Ok(())
    }

    /// The org's active duplicate rules on this save (see [`DuplicateRule`]): 400
    /// `DUPLICATES_DETECTED` with the alert text and a `duplicateResult` naming the matched
    /// records, unless the action allows the save (or allows it after an alert and the request
    /// sent `allowSave=true`).
    fn check_duplicates(
        &self,
        ctx: &Ctx<'_>,
        object: &SObjectSpec,
        record: &Record,
        own_id: Option<&str>,
    ) -> Result<(), Vec<ApiError>> {
        for rule in ctx
            .org
            .duplicate_rules
            .iter()
            .filter(|r| r.active && r.sobject == object.name)
        {
            let action = if own_id.is_some() {
                rule.on_edit
            } else {
                rule.on_create
            };
            let refuses = match action {
                DuplicateAction::Allow => false,
                DuplicateAction::AllowAlert => !ctx.allow_save,
                DuplicateAction::Block => true,
            };
            if !refuses {
                continue;
            }
            let text = |fields: &Map<String, Value>, name: &str| {
                fields
                    .get(name)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_lowercase)
            };
            let mut match_results = Vec::new();
            for target in &rule.match_against {
                let Some(target_spec) = ctx.org.sobject(target) else {
                    continue;
                };
                let has = |name: &str| target_spec.fields.iter().any(|f| f.name == name);
                let matched: Vec<Value> = self
                    .by_object
                    .get(target)
                    .into_iter()
                    .flat_map(BTreeMap::values)
                    .filter(|id| Some(id.as_str()) != own_id)
                    .filter_map(|id| self.records.get(id).map(|r| (id, r)))
                    .filter(|(_, other)| {
                        rule.match_fields.iter().any(|group| {
                            group.iter().all(|name| {
                                has(name)
                                    && text(&record.fields, name).is_some()
                                    && text(&record.fields, name) == text(&other.fields, name)
                            })
                        })
                    })
                    .map(|(id, _)| {
                        json!({
                            "additionalInformation": [],
                            "fieldDiffs": [],
                            "matchConfidence": 100.0,
                            "record": {
                                "attributes": {
                                    "type": target,
                                    "url": format!(
                                        "/services/data/v{}/sobjects/{target}/{id}",
                                        ctx.version.unwrap_or("66.0")
                                    ),
                                },
                                "Id": id,
                            },
                        })
                    })
                    .collect();
                if !matched.is_empty() {
                    match_results.push(json!({
                        "entityType": target,
                        "errors": [],
                        "matchEngine": "ExactMatchEngine",
                        "matchRecords": matched,
                        "rule": rule.matching_rule,
                        "size": matched.len(),
                        "success": true,
                    }));
                }
            }
            if !match_results.is_empty() {
                let mut error = err("DUPLICATES_DETECTED", rule.alert_text.clone(), &[]);
                error.duplicate_result = Some(json!({
                    "allowSave": action == DuplicateAction::AllowAlert,
                    "duplicateRule": rule.name,
                    "duplicateRuleEntityType": rule.sobject,
                    "errorMessage": rule.alert_text,
                    "matchResults": match_results,
                }));
                return Err(vec![error]);
            }
        }
        Ok(())
    }

    fn check_unique(
        &self,
        object: &SObjectSpec,
        record: &Record,
        own_id: Option<&str>,
    ) -> Result<(), Vec<ApiError>> {
        for (key, unique) in Self::index_keys(record, Some(object)) {
            if !unique {
                continue;
            }
            if let Some(other) = self
                .key_index
                .get(&key)
                .and_then(|ids| ids.iter().find(|x| Some(x.as_str()) != own_id))
            {
                let field = object
                    .fields
                    .iter()
                    .find(|f| f.name.eq_ignore_ascii_case(&key.1))
                    .map(|f| f.name.as_str())
                    .unwrap_or(&key.1);
                return Err(vec![err(
                    "DUPLICATE_VALUE",
                    format!(
                        "duplicate value found: {field} duplicates value on record with id: {other}"
                    ),
                    &[],
                )]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_valid_suffix() {
        let id = make_id("00Q", 12345);
        assert_eq!(id.len(), 18);
        assert!(id.starts_with("00Q"));
        assert!(is_valid_id(&id));
        assert!(is_valid_id(&id[..15]));
        assert!(!is_valid_id("00Q5g0000003D7ZZZZ"));
        // Salesforce's documented example: 15-char 001A0000006Vm9r → 18-char suffix IAC.
        assert_eq!(id15_to_18("001A0000006Vm9r"), "001A0000006Vm9rIAC");
    }

    #[test]
    fn an_ids_serial_is_read_back_from_it() {
        for n in [1, 61, 62, 12_345, 3_844_000, 839_299_365_868_340_223] {
            assert_eq!(serial(&make_id("00U", n)), n);
        }
        assert!(serial(&make_id("00Q", 9)) < serial(&make_id("00Q", 10)));
    }

    #[test]
    fn the_wire_datetime_is_what_its_format_description_writes() {
        let first = OffsetDateTime::new_utc(time::Date::MIN, time::Time::MIDNIGHT);
        let last = OffsetDateTime::new_utc(time::Date::MAX, time::Time::MAX);
        let step = (last.unix_timestamp() - first.unix_timestamp()) / 3_001;
        for n in 0..=3_001 {
            let at = OffsetDateTime::from_unix_timestamp(first.unix_timestamp() + n * step)
                .unwrap()
                .replace_nanosecond(u32::try_from(n).unwrap() * 333_331 % 1_000_000_000)
                .unwrap();
            let local = at.checked_to_offset(time::UtcOffset::from_hms(5, 45, 0).unwrap());
            for at in std::iter::once(at).chain(local) {
                let described = at
                    .to_offset(time::UtcOffset::UTC)
                    .format(WIRE_DATETIME)
                    .unwrap();
                assert_eq!(format_datetime(at), described);
            }
        }
    }

    #[test]
    fn datetimes_normalise_to_utc() {
        let at = parse_datetime("2026-12-03T13:00:00+01:00").unwrap();
        assert_eq!(format_datetime(at), "2026-12-03T12:00:00.000+0000");
        for (wire, utc) in [
            (
                "2026-12-03T12:00:00.000+0000",
                "2026-12-03T12:00:00.000+0000",
            ),
            ("2026-12-03T12:00:00+0000", "2026-12-03T12:00:00.000+0000"),
            ("2026-12-03T12:00:00.5-0130", "2026-12-03T13:30:00.500+0000"),
            ("2026-12-03T12:00:00Z", "2026-12-03T12:00:00.000+0000"),
        ] {
            assert_eq!(
                parse_datetime(wire).map(format_datetime).as_deref(),
                Some(utc)
            );
        }
        assert!(parse_datetime("2026-12-03T12:00:00+00000").is_none());
        // Both spellings of an offset accept the same hours (RFC 3339: 00–23).
        assert!(parse_datetime("2026-12-03T12:00:00+24:00").is_none());
        assert!(parse_datetime("2026-12-03T12:00:00+2400").is_none());
        assert!(parse_datetime("2026-12-03T12:00:00+2500").is_none());
        assert_eq!(
            parse_datetime("2026-12-31T23:59:60+0000"),
            parse_datetime("2026-12-31T23:59:60Z"),
            "a leap second either way"
        );
        assert!(parse_datetime("2026-12-03T12:00:00.000+0a00").is_none());
        assert!(parse_datetime("tomorrow").is_none());
        assert!(parse_datetime("2026-12-03 12:00:00Z").is_none(), "space");
    }

    #[test]
    fn email_shapes() {
        assert!(looks_like_email("jane.doe@globex.example", false));
        assert!(!looks_like_email("jane.doe", false));
        assert!(!looks_like_email("a@b", false));
        assert!(!looks_like_email("a b@c.d", false));
        assert!(looks_like_email("ann@xn--bcher-kva.example", false));
        assert!(!looks_like_email("ann@bücher.example", false));
        assert!(!looks_like_email("josé@example.org", false));
        assert!(looks_like_email("ann@bücher.example", true));
        assert!(looks_like_email("josé@example.org", true));
    }
}
