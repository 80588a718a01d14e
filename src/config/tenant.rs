//! Tenant files: `config/tenants/<tenant>.toml` — the org, credentials by reference, quota share,
//! and the mapping from a booking to the records to write.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    /// What a booking does when the org's duplicate rules match a record it writes:
    /// `save_anyway` (the default), `relate_to_existing` or `fail` (see [`DuplicateRulePolicy`]).
    #[serde(default)]
    pub duplicate_rule: DuplicateRulePolicy,
}

/// True when `url` is https, or http to a loopback host (the emulator): the only URLs the
/// service sends credentials or tokens to (a login URL, and the `instance_url` a sign-in returns).
pub fn is_allowed_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|parsed| is_allowed(&parsed))
}

/// [`is_allowed_url`] of a URL already parsed.
fn is_allowed(parsed: &url::Url) -> bool {
    match parsed.scheme() {
        "https" => true,
        "http" => match parsed.host() {
            Some(url::Host::Domain(domain)) => domain == "localhost",
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
            None => false,
        },
        _ => false,
    }
}

/// Why `url` cannot be where the integration user signs in, if it cannot. The token request goes
/// to `{login_url}/services/oauth2/token`, a JWT bearer assertion names the login URL as its
/// audience (`aud`: `https://login.salesforce.com`, `https://test.salesforce.com` or the My
/// Domain URL), and the org's own URL comes back in the answer (`instance_url`; Salesforce Help,
/// "OAuth 2.0 JWT Bearer Flow for Server-to-Server Integration"). So the login URL is an origin
/// alone, written as Salesforce writes it — `https://login.salesforce.com`, a My Domain
/// (`https://acme.my.salesforce.com`), or the emulator's `http://127.0.0.1:<port>` — and the text
/// is used as written. Any other would fail every sign-in, each booking retried through every
/// tier before its dead letter; it is refused when the file loads.
fn login_url_problem(url: &str) -> Option<String> {
    const EXAMPLES: &str =
        "such as https://login.salesforce.com or https://MyDomain.my.salesforce.com";
    let Ok(parsed) = url::Url::parse(url) else {
        return Some(format!(
            "not an absolute URL: the org's sign-in address, {EXAMPLES}"
        ));
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Some(
            "must not hold credentials: the integration user signs in with the [auth] section"
                .to_owned(),
        );
    }
    if !matches!(parsed.scheme(), "https" | "http") || parsed.host().is_none() {
        return Some(format!("must be an https:// address, {EXAMPLES}"));
    }
    if !is_allowed(&parsed) {
        return Some(
            "must be https://: http:// is only for the emulator on a loopback address (127.0.0.1, [::1], localhost)".to_owned(),
        );
    }
    if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
        return Some(
            "must be the sign-in address alone, without a path, query or fragment (the service adds /services/oauth2/token)".to_owned(),
        );
    }
    // What the URL parser made of the text (lower case, no default port, no stray characters)
    // is what Salesforce expects; the text itself is what the service sends.
    let origin = parsed.origin().ascii_serialization();
    if url.strip_suffix('/').unwrap_or(url) != origin {
        return Some(format!(
            "write it as {origin}: the text is sent as written (the sign-in's audience and the token endpoint's address)"
        ));
    }
    None
}

/// The first REST API version with the Composite Graph resource
/// (`/services/data/v50.0/composite/graph`; REST API Developer Guide, "Composite Graph").
const MIN_API_VERSION: u32 = 50;

/// Whether `version` names a REST API version the service can write through: `NN.0`, the form
/// Salesforce lists under `/services/data/` (its `version` field), from
/// [`MIN_API_VERSION`] on. Any other form makes every request a `404 NOT_FOUND`.
fn is_graph_api_version(version: &str) -> bool {
    version
        .strip_suffix(".0")
        // Written back, the number must be the text: no sign, no leading zero.
        .and_then(|major| major.parse::<u32>().ok().filter(|n| n.to_string() == major))
        .is_some_and(|major| major >= MIN_API_VERSION)
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
    /// What happens to a field value the org refuses although the mapping rendered it (an
    /// address an Email field cannot take, see [`InvalidValue`]): for every field of this
    /// record, unless [`RecordMapping::invalid_value_fields`] names the field.
    #[serde(default)]
    pub invalid_value: InvalidValue,
    /// Field name → what happens to a value of that field the org refuses.
    #[serde(default)]
    pub invalid_value_fields: BTreeMap<String, InvalidValue>,
}

/// What a booking does with a value the org refuses for one field (`INVALID_EMAIL_ADDRESS`),
/// once what can be repaired is: an internationalized domain is written punycoded (IDNA,
/// `ann@bücher.example` → `ann@xn--bcher-kva.example`), which every org takes; a non-ASCII
/// local part (`josé@…`) has no ASCII form, and an org without Email Address
/// Internationalization refuses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidValue {
    /// Write the record without the field: the booking is kept, the field counted in
    /// `portals_crm_fields_dropped_total` and logged (value masked).
    #[default]
    Drop,
    /// Fail the booking: dead-lettered as `salesforce_<errorCode>`, naming the field.
    Fail,
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

/// A tenant file's name without `.toml`.
fn file_stem(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned()
}

impl TenantConfig {
    /// The sObjects whose describes the mapping is checked against
    /// ([`crate::plan::validate::validate`]): every record's, once each, and `EventRelation`
    /// when `[relations]` names a parent (its `IsParent` exists only with Shared Activities).
    pub fn described_sobjects(&self) -> Vec<&str> {
        let mut sobjects: Vec<&str> = Vec::new();
        for record in &self.records {
            if !sobjects.contains(&record.sobject.as_str()) {
                sobjects.push(&record.sobject);
            }
        }
        if self
            .relations
            .as_ref()
            .is_some_and(|r| r.parent == Parent::First)
        {
            sobjects.push("EventRelation");
        }
        sobjects
    }

    /// Loads one tenant file; the tenant id defaults to the file stem, and its relative paths
    /// resolve against the file's directory (see [`TenantConfig::resolve_paths`]).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut tenant = Self::parse(
            TenantSource {
                file: file_stem(path),
                text,
            },
            &path.display().to_string(),
        )?;
        tenant.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(tenant)
    }

    /// Makes the file's relative paths (private key, client secret, CA certificate) relative
    /// to `base`, the directory of the file that names them, as Prometheus does with its rule
    /// files: the service then finds them whatever its working directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        match &mut self.auth {
            AuthConfig::JwtBearer {
                private_key_file: Some(path),
                ..
            }
            | AuthConfig::ClientCredentials {
                client_secret_file: Some(path),
                ..
            } => resolve(path),
            AuthConfig::JwtBearer { .. } | AuthConfig::ClientCredentials { .. } => {}
        }
        if let Some(path) = &mut self.org.ca_cert_file {
            resolve(path);
        }
    }

    /// Parses a tenant file's text; `origin` names it in errors.
    pub fn parse(source: TenantSource, origin: &str) -> Result<Self, String> {
        let mut tenant: TenantConfig =
            toml::from_str(&source.text).map_err(|e| format!("{origin}: {e}"))?;
        if tenant.tenant.is_empty() {
            tenant.tenant = source.file.clone();
        }
        if let Some(problem) = login_url_problem(&tenant.org.login_url) {
            return Err(format!("{origin}: org.login_url: {problem}"));
        }
        if !is_graph_api_version(&tenant.org.api_version) {
            return Err(format!(
                "{origin}: org.api_version: must be a Salesforce REST API version such as \"66.0\", {MIN_API_VERSION}.0 or later (the Composite Graph API's first), without the \"v\""
            ));
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
}

/// What a write does when an org's duplicate rule (Duplicate Management) finds that a record
/// matches existing ones — a new org refuses such a Lead with 400 `DUPLICATES_DETECTED`
/// (the standard Lead rule: allow, with an alert). Tenant file: `[org] duplicate_rule`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicateRulePolicy {
    /// The default: send `Sforce-Duplicate-Rule-Header: allowSave=true` with every graph, so a
    /// rule whose action is "allow with an alert" saves the record (it still appears in the
    /// org's duplicate reports) and the booking is written. A rule set to **block** still
    /// refuses: an admin who wants no duplicate Leads at all says so in the org.
    /// <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/headers_duplicaterules.htm>
    #[default]
    SaveAnyway,
    /// Send no header; when a rule refuses a record with `DUPLICATES_DETECTED`, write the
    /// booking with the matched record in its place: the Event and every reference to the
    /// refused record point at the existing Lead or Contact, and the new record is not created
    /// (see [`crate::plan::duplicates`] for which match is taken and when none can be). The
    /// choice is remembered, so later versions of the booking do not meet the rule again. A
    /// rule set to **block** is handled the same way.
    RelateToExisting,
    /// Send no header: a match fails the booking, dead-lettered as
    /// `salesforce_duplicates_detected` with the matched record ids in its message.
    Fail,
}

impl DuplicateRulePolicy {
    /// The `Sforce-Duplicate-Rule-Header` to send, if any.
    pub fn header(self) -> Option<(&'static str, String)> {
        match self {
            Self::SaveAnyway => Some(("Sforce-Duplicate-Rule-Header", "allowSave=true".into())),
            Self::RelateToExisting | Self::Fail => None,
        }
    }

    /// As written in the tenant file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SaveAnyway => "save_anyway",
            Self::RelateToExisting => "relate_to_existing",
            Self::Fail => "fail",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped demo tenant with its `login_url` replaced.
    fn tenant_file(login_url: &str) -> TenantSource {
        const DEMO: &str = include_str!("../../config/tenants/demo.toml");
        let shipped = "login_url = \"http://127.0.0.1:7800\"";
        assert!(DEMO.contains(shipped) && DEMO.contains("api_version = \"66.0\""));
        TenantSource {
            file: "acme".into(),
            text: DEMO.replace(shipped, &format!("login_url = {login_url:?}")),
        }
    }

    #[test]
    fn only_https_or_loopback() {
        assert!(is_allowed_url("https://acme.my.salesforce.com"));
        assert!(is_allowed_url("http://127.0.0.1:7800"));
        assert!(is_allowed_url("http://localhost:7800"));
        assert!(is_allowed_url("http://[::1]:7800"));
        assert!(!is_allowed_url("http://acme.my.salesforce.com"));
        assert!(!is_allowed_url("http://10.0.0.5:7800"));
        assert!(!is_allowed_url("ftp://127.0.0.1"));
    }

    #[test]
    fn sign_in_addresses_of_every_kind_load() {
        for url in [
            "https://login.salesforce.com",
            "https://test.salesforce.com/",
            "https://acme.my.salesforce.com",
            "https://acme--dev.sandbox.my.salesforce.com",
            "https://proxy.example:8443",
            "http://127.0.0.1:7800",
            "http://localhost:7800",
            "http://[::1]:7800",
        ] {
            let tenant = TenantConfig::parse(tenant_file(url), "acme.toml");
            assert!(tenant.is_ok(), "{url}: {:?}", tenant.err());
        }
    }

    #[test]
    fn api_versions_are_salesforce_s_form_from_composite_graph_on() {
        for (version, ok) in [
            ("66.0", true),
            ("50.0", true),
            ("49.0", false),
            ("v66.0", false),
            ("66", false),
            ("66.1", false),
            ("+66.0", false),
            ("066.0", false),
            ("", false),
        ] {
            let shipped = "api_version = \"66.0\"";
            let source = TenantSource {
                file: "demo".into(),
                text: tenant_file("http://127.0.0.1:7800")
                    .text
                    .replace(shipped, &format!("api_version = {version:?}")),
            };
            match TenantConfig::parse(source, "demo.toml") {
                Ok(tenant) => {
                    assert!(ok, "{version} was accepted");
                    assert_eq!(tenant.org.api_version, version);
                }
                Err(error) => {
                    assert!(!ok, "{version}: {error}");
                    assert!(error.starts_with("demo.toml: org.api_version: "), "{error}");
                }
            }
        }
    }

    #[test]
    fn a_login_url_that_cannot_sign_in_is_refused_naming_the_field() {
        for (url, why) in [
            ("login.salesforce.com", "not an absolute URL"),
            ("ftp://login.salesforce.com", "must be an https:// address"),
            (
                "http://acme.my.salesforce.com",
                "http:// is only for the emulator",
            ),
            ("http://10.0.0.5:7800", "http:// is only for the emulator"),
            (
                "HTTPS://Login.Salesforce.com",
                "write it as https://login.salesforce.com:",
            ),
            (
                "https://login.salesforce.com:443",
                "write it as https://login.salesforce.com:",
            ),
            (
                " https://login.salesforce.com",
                "write it as https://login.salesforce.com:",
            ),
            (
                "https://login.salesforce.com ",
                "write it as https://login.salesforce.com:",
            ),
            (
                "https:login.salesforce.com",
                "write it as https://login.salesforce.com:",
            ),
            (
                "https://login.salesforce.com\\",
                "write it as https://login.salesforce.com:",
            ),
            (
                "https://login.salesforce.com/.",
                "write it as https://login.salesforce.com:",
            ),
            (
                "https://u:hunter2@login.salesforce.com",
                "must not hold credentials",
            ),
            (
                "https://login.salesforce.com/services/oauth2/token",
                "without a path",
            ),
            ("https://login.salesforce.com/?x=1", "without a path, query"),
            ("https://login.salesforce.com/#top", "or fragment"),
            ("https://", "not an absolute URL"),
            ("https://login.salesforce.com:99999", "not an absolute URL"),
        ] {
            let error = TenantConfig::parse(tenant_file(url), "acme.toml").unwrap_err();
            assert!(
                error.starts_with("acme.toml: org.login_url: ") && error.contains(why),
                "{url}: {error}"
            );
            assert!(!error.contains("hunter2"), "{error}");
        }
    }
}
