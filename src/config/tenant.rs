//! Tenant files: `config/tenants/<tenant>.toml` — the org, credentials by reference, quota share,
//! and the mapping from a booking to the records to write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use crate::salesforce::{Credentials, OrgEndpoint};

/// One tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant id as in the events' `tenantid`; defaults to the file name.
    #[serde(default)]
    pub tenant: String,
    /// The Salesforce org.
    pub org: OrgConfig,
    /// How the integration user signs in. Secrets by reference only.
    pub auth: AuthConfig,
    /// Quota guard.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The records to write for one booking, in order.
    pub records: Vec<RecordMapping>,
    /// Which records are related to the Event, and how (EventRelation).
    #[serde(default)]
    pub relations: Option<RelationsMapping>,
    /// The file this came from, for the last-known-good copy (none when built in code).
    #[serde(skip)]
    pub source: Option<TenantSource>,
}

/// One tenant file of a directory: its stem, and the tenant or why it did not load.
pub type LoadedFile = (String, Result<TenantConfig, String>);

/// A tenant file as read: its name (without `.toml`) and its text. The text holds secrets by
/// reference only, so it may be kept in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSource {
    /// File stem: the tenant id unless the file sets `tenant`.
    pub file: String,
    /// The TOML text.
    pub text: String,
}

/// Where the org is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgConfig {
    /// OAuth login URL (`https://login.salesforce.com`, a My Domain URL, or the emulator).
    pub login_url: String,
    /// REST API version, e.g. `66.0`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// An extra CA certificate (PEM file) to trust: a TLS-inspecting proxy, or the emulator
    /// started with `--tls`.
    #[serde(default)]
    pub ca_cert_file: Option<PathBuf>,
}

fn default_api_version() -> String {
    "66.0".into()
}

/// Credentials, by reference: the secret itself lives in a file or an environment variable.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "flow", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// OAuth 2.0 JWT bearer flow.
    JwtBearer {
        /// Connected app consumer key.
        consumer_key: String,
        /// Integration user's username.
        username: String,
        /// PEM private key file.
        private_key_file: Option<PathBuf>,
        /// Environment variable holding the PEM private key.
        private_key_env: Option<String>,
    },
    /// OAuth 2.0 client credentials flow.
    ClientCredentials {
        /// Connected app consumer key.
        client_id: String,
        /// File holding the consumer secret.
        client_secret_file: Option<PathBuf>,
        /// Environment variable holding the consumer secret.
        client_secret_env: Option<String>,
    },
}

/// How much of the org's daily API allocation portals-crm may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Fraction of the daily API requests (0–1) above which the tenant is paused.
    #[serde(default = "default_share")]
    pub api_quota_share: f64,
}

fn default_share() -> f64 {
    0.5
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            api_quota_share: default_share(),
        }
    }
}

/// What a mapping record does with its Salesforce record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Create or update by external id.
    #[default]
    Upsert,
    /// Delete by external id (e.g. the Event when a booking is cancelled, with `when`).
    Delete,
}

/// One record to write. String field values are minijinja templates over the event; other
/// TOML values are constants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordMapping {
    /// Reference name; later records use `@{name.id}` (or `@{name_0.id}` for `for_each`).
    #[serde(rename = "ref")]
    pub reference: String,
    /// Target sObject.
    pub sobject: String,
    /// `attendees`: one record per attendee, references `<ref>_<index>`.
    #[serde(default)]
    pub for_each: Option<String>,
    /// An expression; the record is written only when it is true.
    #[serde(default)]
    pub when: Option<String>,
    /// Upsert (default) or delete the record.
    #[serde(default)]
    pub action: Action,
    /// External id field of the upsert.
    pub external_id_field: String,
    /// Template of the external id value.
    pub external_id: String,
    /// Field name → template or constant.
    #[serde(default)]
    pub fields: BTreeMap<String, serde_json::Value>,
}

/// Which of a booking's records `EventRelation` relates to its Event, and how. Salesforce
/// (Shared Activities) relates an event to one lead or up to 50 contacts as its Who
/// (`IsParent`) and to up to 1,000 invitees (`IsInvitee`); a person who is both has one relation
/// with both flags
/// (https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_eventattendee.htm).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelationsMapping {
    /// The `ref` of the Event record.
    pub event: String,
    /// The `ref` of a `for_each = "attendees"` record: each of its records is related.
    pub records: String,
    /// Which of them is the Event's Who (`IsParent`): the first, or none.
    #[serde(default)]
    pub parent: Parent,
    /// Every one of them is an invitee (`IsInvitee`).
    #[serde(default = "yes")]
    pub invitees: bool,
}

/// Which related record is the Event's Who.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parent {
    /// The first attendee's record.
    #[default]
    First,
    /// None: the relations are invitees only.
    None,
}

fn yes() -> bool {
    true
}

fn read_secret(file: Option<&Path>, env: Option<&str>, what: &str) -> Result<SecretString, String> {
    match (file, env) {
        (Some(path), None) => std::fs::read_to_string(path)
            .map(|s| SecretString::from(s.trim().to_owned()))
            .map_err(|e| format!("{what}: cannot read {}: {e}", path.display())),
        (None, Some(name)) => std::env::var(name)
            .map(SecretString::from)
            .map_err(|_| format!("{what}: environment variable {name} is not set")),
        _ => Err(format!(
            "{what}: give exactly one of a _file or an _env reference"
        )),
    }
}

/// A tenant file's name without `.toml`.
fn file_stem(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned()
}

impl TenantConfig {
    /// Loads one tenant file; the tenant id defaults to the file stem.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(
            TenantSource {
                file: file_stem(path),
                text,
            },
            &path.display().to_string(),
        )
    }

    /// Parses a tenant file's text; `origin` names it in errors.
    pub fn parse(source: TenantSource, origin: &str) -> Result<Self, String> {
        let mut tenant: TenantConfig =
            toml::from_str(&source.text).map_err(|e| format!("{origin}: {e}"))?;
        if tenant.tenant.is_empty() {
            tenant.tenant = source.file.clone();
        }
        tenant.source = Some(source);
        Ok(tenant)
    }

    /// Every `*.toml` in `dir`, sorted, each with its file stem and what loading it gave.
    pub fn load_each(dir: &Path) -> Result<Vec<LoadedFile>, String> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("tenants directory {}: {e}", dir.display()))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        Ok(paths
            .into_iter()
            .map(|path| (file_stem(&path), Self::load(&path)))
            .collect())
    }

    /// Loads every `*.toml` in `dir`, reporting every broken file.
    pub fn load_dir(dir: &Path) -> Result<Vec<Self>, Vec<String>> {
        let mut tenants = Vec::new();
        let mut problems = Vec::new();
        for (_, loaded) in Self::load_each(dir).map_err(|e| vec![e])? {
            match loaded {
                Ok(t) => tenants.push(t),
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(tenants)
        } else {
            Err(problems)
        }
    }

    /// Resolves the credentials references into secrets.
    pub fn credentials(&self) -> Result<Credentials, String> {
        let what = format!("tenant {}: auth", self.tenant);
        Ok(match &self.auth {
            AuthConfig::JwtBearer {
                consumer_key,
                username,
                private_key_file,
                private_key_env,
            } => Credentials::JwtBearer {
                consumer_key: consumer_key.clone(),
                username: username.clone(),
                private_key: read_secret(
                    private_key_file.as_deref(),
                    private_key_env.as_deref(),
                    &what,
                )?,
            },
            AuthConfig::ClientCredentials {
                client_id,
                client_secret_file,
                client_secret_env,
            } => Credentials::ClientCredentials {
                client_id: client_id.clone(),
                client_secret: read_secret(
                    client_secret_file.as_deref(),
                    client_secret_env.as_deref(),
                    &what,
                )?,
            },
        })
    }

    /// The client endpoint of this tenant's org.
    pub fn endpoint(&self, timeout: Duration) -> Result<OrgEndpoint, String> {
        Ok(OrgEndpoint {
            tenant: self.tenant.clone(),
            login_url: self.org.login_url.trim_end_matches('/').to_owned(),
            api_version: self.org.api_version.clone(),
            credentials: self.credentials()?,
            timeout,
            ca_certificate: self
                .org
                .ca_cert_file
                .as_ref()
                .map(|path| {
                    std::fs::read(path).map_err(|e| {
                        format!(
                            "tenant {}: ca_cert_file {}: {e}",
                            self.tenant,
                            path.display()
                        )
                    })
                })
                .transpose()?,
        })
    }
}
