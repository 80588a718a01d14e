//! The emulated org's model: sObjects and fields, users, connected apps, permission sets and
//! validation rules, loaded from TOML or JSON (the built-in demo org is `demo_org.toml`).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::salesforce::model::{FieldDescribe, GlobalSObject, PicklistValue, SObjectDescribe};

/// The built-in demo org.
pub const DEMO_ORG_TOML: &str = include_str!("demo_org.toml");
/// Public half of the demo JWT key (`config/keys/demo-jwt.key`), for the demo only.
pub const DEMO_PUBLIC_KEY: &str = include_str!("demo-jwt.pub.pem");

/// A whole org file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgSpec {
    /// Org-wide settings.
    pub org: OrgSettings,
    /// Connected apps that may mint tokens.
    #[serde(default)]
    pub connected_apps: Vec<ConnectedApp>,
    /// Users (also the `User` records).
    #[serde(default)]
    pub users: Vec<UserSpec>,
    /// Profiles: what the emulator models of them is the Login IP Ranges.
    #[serde(default)]
    pub profiles: Vec<Profile>,
    /// Permission sets.
    #[serde(default)]
    pub permission_sets: Vec<PermissionSet>,
    /// Validation rules.
    #[serde(default)]
    pub validation_rules: Vec<ValidationRule>,
    /// Active duplicate rules (Duplicate Management). A new org has the standard Lead,
    /// Contact and Account rules on; the demo org models the Lead one.
    #[serde(default)]
    pub duplicate_rules: Vec<DuplicateRule>,
    /// Sharing rules.
    #[serde(default)]
    pub sharing_rules: Vec<SharingRule>,
    /// sObjects.
    pub sobjects: Vec<SObjectSpec>,
    /// The fields Shared Activities adds ([`SHARED_ACTIVITY_FIELDS`]), kept aside while it is
    /// off ([`OrgSpec::set_shared_activities`]).
    #[serde(skip)]
    shared_activity_fields: Vec<FieldSpec>,
}

/// The `EventRelation` fields that exist only with Shared Activities: "IsParent/IsWhat visible
/// only with Shared Activities" (`salesforce-api.md` §4a, from the EventRelation object
/// reference: without it "EventRelation records only represent invitees").
/// <https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_eventattendee.htm>
pub const SHARED_ACTIVITY_FIELDS: [&str; 2] = ["IsParent", "IsWhat"];

/// Org-wide settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgSettings {
    /// Display name.
    pub name: String,
    /// Daily API request allocation.
    #[serde(default = "default_daily_limit")]
    pub daily_api_limit: u64,
    /// Rows per query page unless `Sforce-Query-Options: batchSize=N` asks for fewer.
    #[serde(default = "default_batch_size")]
    pub query_batch_size: usize,
    /// JWT audiences accepted besides the emulator's own base URL.
    #[serde(default)]
    pub login_audiences: Vec<String>,
    /// Setup → Email Address Internationalization ("Allow international email addresses").
    /// Off, an Email field takes ASCII addresses only: a non-ASCII character anywhere (`josé@…`,
    /// `…@bücher.example`) is refused with 400 `INVALID_EMAIL_ADDRESS` "`<label>`: invalid email
    /// address: `<value>`", fields `[<name>]`; a punycoded domain (`xn--bcher-kva.example`) is
    /// ASCII and accepted. On, UTF-8 addresses are accepted in the local part and the domain.
    /// Orgs created in Summer '20 or later have it on by default, hence the default here; an
    /// older org, or one whose admin turned it off, has it off.
    /// <https://help.salesforce.com/s/articleView?id=sales.emailadmin_eai_set_up.htm>
    #[serde(default = "yes")]
    pub email_address_internationalization: bool,
    /// Setup → Activity Settings → "Enable Multiday Events". Off, an event lasts at most a day:
    /// a longer one is refused with 400 `FIELD_INTEGRITY_EXCEPTION` "Duration must be between 0
    /// and 1440 minutes: Duration", fields `[DurationInMinutes]`; on, up to 14 days (the same
    /// refusal with 20160 minutes, the wording by analogy). Default off, as in an org nobody has
    /// configured for multiday events.
    /// <https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_event.htm>
    #[serde(default)]
    pub multiday_events: bool,
    /// Setup → Activity Settings → "Allow Users to Relate Multiple Contacts to Tasks and
    /// Events" (Shared Activities). Off, `EventRelation` has no `IsParent` or `IsWhat`
    /// ([`SHARED_ACTIVITY_FIELDS`]): its describe omits them, a write naming one is refused with
    /// 400 `INVALID_FIELD` (No such column 'IsParent' on sobject of type EventRelation) and a
    /// query selecting one with 400 `INVALID_FIELD` (No such column 'IsParent' on entity
    /// 'EventRelation'), as for any field the org does not have; a relation is an invitee only.
    /// The demo org has it on; an org where nobody enabled it has it off.
    #[serde(default = "yes")]
    pub shared_activities: bool,
}

impl OrgSettings {
    /// The longest event the org takes, in minutes (see [`OrgSettings::multiday_events`]).
    pub fn max_event_minutes(&self) -> i64 {
        if self.multiday_events {
            14 * 24 * 60
        } else {
            24 * 60
        }
    }
}

fn default_daily_limit() -> u64 {
    100_000
}

fn default_batch_size() -> usize {
    2000
}

/// A connected app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectedApp {
    /// Display name.
    pub name: String,
    /// The consumer key (client id; JWT `iss`).
    pub consumer_key: String,
    /// The consumer secret for the client-credentials flow.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// Username the client-credentials flow runs as.
    #[serde(default)]
    pub run_as: Option<String>,
    /// PEM public key (or `builtin:demo`) that verifies JWT assertions.
    #[serde(default)]
    pub certificate: Option<String>,
    /// Users pre-authorized for the JWT flow.
    #[serde(default)]
    pub pre_authorized: Vec<String>,
    /// The OAuth policy "IP Relaxation": whether a token request from outside the user's
    /// profile Login IP Ranges is refused.
    #[serde(default)]
    pub ip_relaxation: IpRelaxation,
}

/// A connected app's IP Relaxation policy (Manage Connected Apps → Edit Policies).
///
/// Salesforce: "Enforce IP restrictions" (the default) refuses a sign-in from outside the
/// Login IP Ranges of the user's profile; "Relax IP restrictions" lets the app's users sign in
/// from anywhere. ("Relax IP restrictions with second factor" asks for a second factor, which
/// a server-to-server flow cannot give: it behaves as `enforce` here.)
/// <https://help.salesforce.com/s/articleView?id=sf.connected_app_edit_ip_ranges.htm>
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpRelaxation {
    /// Enforce the profile's Login IP Ranges.
    #[default]
    Enforce,
    /// Ignore them for this app.
    Relax,
}

/// A profile. Only the part that decides sign-in is modelled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Profile name, as `users.profile` names it.
    pub name: String,
    /// Login IP Ranges. Empty: sign-in from any address (Salesforce's rule for a profile with
    /// no ranges).
    #[serde(default)]
    pub login_ip_ranges: Vec<IpRange>,
}

/// One Login IP Range, both ends included (Salesforce asks for a start and an end address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IpRange {
    /// First address.
    pub start: std::net::IpAddr,
    /// Last address.
    pub end: std::net::IpAddr,
}

impl IpRange {
    /// Whether `ip` lies in the range (an IPv4-mapped IPv6 peer counts as its IPv4 address).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.start, self.end, ip) {
            (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b), std::net::IpAddr::V4(x)) => {
                a <= x && x <= b
            }
            (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b), std::net::IpAddr::V6(x)) => {
                a <= x && x <= b
            }
            _ => false,
        }
    }
}

impl ConnectedApp {
    /// The PEM public key that verifies this app's JWT assertions.
    pub fn public_key_pem(&self) -> Option<&str> {
        match self.certificate.as_deref() {
            Some("builtin:demo") => Some(DEMO_PUBLIC_KEY),
            other => other,
        }
    }
}

/// A user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// Username (unique, email-shaped).
    pub username: String,
    /// Email.
    pub email: String,
    /// First name.
    #[serde(default)]
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// Active users can sign in and own records.
    #[serde(default = "yes")]
    pub active: bool,
    /// Has "API Enabled".
    #[serde(default = "yes")]
    pub api_enabled: bool,
    /// Assigned permission sets.
    #[serde(default)]
    pub permission_sets: Vec<String>,
    /// The user's profile (`profiles.name`), for its Login IP Ranges.
    #[serde(default)]
    pub profile: Option<String>,
}

fn yes() -> bool {
    true
}

/// A permission set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionSet {
    /// API name.
    pub name: String,
    /// Label.
    #[serde(default)]
    pub label: String,
    /// Object permissions: letters of `CRUD`, plus `V` (View All: read every record whatever
    /// its sharing) and `M` (Modify All: read, edit and delete every record).
    #[serde(default)]
    pub objects: BTreeMap<String, String>,
    /// Field permissions `object.field` → `read` | `edit`, keys in lower case: API names are
    /// case-insensitive, and a field's permission is looked up by its key for every field of
    /// every record written ([`PermissionSet::grant_field`] keeps the keys so).
    #[serde(default, deserialize_with = "lowercase_keys")]
    fields: BTreeMap<String, String>,
}

impl PermissionSet {
    /// Field permissions: `object.field` in lower case → `read` | `edit` | `none`.
    pub fn field_permissions(&self) -> &BTreeMap<String, String> {
        &self.fields
    }

    /// Sets the permission on `field` (`Object.Field`, any case): `read`, `edit` or `none`.
    pub fn grant_field(&mut self, field: &str, access: &str) {
        self.fields
            .insert(field.to_ascii_lowercase(), access.to_owned());
    }
}

/// A map whose keys are API names, with the keys in lower case.
fn lowercase_keys<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(deserializer)?;
    Ok(map
        .into_iter()
        .map(|(key, value)| (key.to_ascii_lowercase(), value))
        .collect())
}

/// A validation rule (the kinds the BookMe package uses).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationRule {
    /// The object it guards.
    pub sobject: String,
    /// Rule name.
    pub name: String,
    /// A number field whose value may not decrease on update.
    pub no_decrease: String,
    /// The message of the FIELD_CUSTOM_VALIDATION_EXCEPTION.
    pub error_message: String,
}

/// A duplicate rule with its matching rule, the kinds a new org has on.
///
/// Matching (the standard Lead matching rule,
/// <https://help.salesforce.com/s/articleView?id=sf.matching_rules_standard_contact_rule.htm>):
/// a record matches an existing record of `match_against` when every field of one group of
/// `match_fields` is non-blank and equal (case-insensitive) on both — the OR of ANDs of the
/// rule's matching equation, with exact instead of fuzzy comparison. A field the other object
/// lacks never matches.
///
/// Actions (Setup → Duplicate Rules): `allow_alert` refuses an API save with 400
/// `DUPLICATES_DETECTED` unless the request carries `Sforce-Duplicate-Rule-Header:
/// allowSave=true`; `block` refuses it always; `allow` saves (the report only).
/// <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/headers_duplicaterules.htm>
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuplicateRule {
    /// Developer name, e.g. `Standard_Lead_Duplicate_Rule`.
    pub name: String,
    /// Rule name (`MasterLabel`), e.g. `Standard Rule for Leads with Duplicate Contacts`;
    /// defaults to the developer name.
    #[serde(default)]
    pub label: Option<String>,
    /// Active (`IsActive`); an inactive rule checks nothing but is listed by a query.
    #[serde(default = "yes")]
    pub active: bool,
    /// The object whose saves it checks.
    pub sobject: String,
    /// The matching rule's developer name, e.g. `Standard_Lead_Match_Rule_v1_0`.
    pub matching_rule: String,
    /// Objects whose records are compared (the rule's own object first).
    pub match_against: Vec<String>,
    /// The matching equation: any group whose fields all match.
    pub match_fields: Vec<Vec<String>>,
    /// Action on create.
    pub on_create: DuplicateAction,
    /// Action on edit.
    pub on_edit: DuplicateAction,
    /// The alert text (the error message of `DUPLICATES_DETECTED`).
    #[serde(default = "default_duplicate_alert")]
    pub alert_text: String,
}

fn default_duplicate_alert() -> String {
    "Use one of these records?".into()
}

/// What a duplicate rule does with a save that matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicateAction {
    /// Save; nothing reported to the API caller.
    Allow,
    /// Refuse unless the caller sends `allowSave=true`.
    AllowAlert,
    /// Refuse always.
    Block,
}

/// An sObject.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SObjectSpec {
    /// API name.
    pub name: String,
    /// Label.
    pub label: String,
    /// Three-character id prefix.
    pub key_prefix: String,
    /// Custom object.
    #[serde(default)]
    pub custom: bool,
    /// The org-wide default for records of this object (default `ReadWrite`).
    #[serde(default)]
    pub sharing_model: SharingModel,
    /// Fields besides the system fields every object has.
    pub fields: Vec<FieldSpec>,
}

impl SObjectSpec {
    /// True when records have an owner (an `OwnerId` field), so sharing applies to them.
    pub fn has_owner(&self) -> bool {
        self.fields.iter().any(|f| f.name == "OwnerId")
    }
}

/// An object's org-wide default (OWD), with the values of the metadata API's `sharingModel`
/// (Setup labels "Private", "Public Read Only", "Public Read/Write"): what a user may do with a
/// record owned by someone else when nothing else (ownership, View All / Modify All, a sharing
/// rule) grants more.
/// <https://help.salesforce.com/s/articleView?id=sf.sharing_model_fields.htm>
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum SharingModel {
    /// Only the owner (and users above, or with View All / Modify All) see the record.
    Private,
    /// Public Read Only: everyone sees it, only the owner edits.
    Read,
    /// Public Read/Write: everyone sees and edits it.
    #[default]
    ReadWrite,
}

/// A sharing rule: records of `sobject` owned by anyone are shared with `shared_with` at
/// `access_level` (an owner-based rule for "all internal users" as owners).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharingRule {
    /// The object whose records are shared.
    pub sobject: String,
    /// Username the records are shared with.
    pub shared_with: String,
    /// `Read` or `Edit`.
    pub access_level: RecordAccess,
}

/// What a user may do with one record (after object permissions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
pub enum RecordAccess {
    /// Invisible: queries skip it, an upsert by external id does not match it.
    None,
    /// Visible, read-only.
    Read,
    /// Visible and editable.
    Edit,
}

/// A field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// API name.
    pub name: String,
    /// Label.
    pub label: String,
    /// Salesforce field type.
    #[serde(rename = "type")]
    pub field_type: String,
    /// Max length for text types.
    #[serde(default)]
    pub length: u32,
    /// Accepts null.
    #[serde(default = "yes")]
    pub nillable: bool,
    /// Writable on create (schema level, before permissions).
    #[serde(default = "yes")]
    pub createable: bool,
    /// Writable on update (schema level, before permissions).
    #[serde(default = "yes")]
    pub updateable: bool,
    /// Gets a value on create when none is given.
    #[serde(default)]
    pub defaulted_on_create: bool,
    /// External id.
    #[serde(default)]
    pub external_id: bool,
    /// Unique.
    #[serde(default)]
    pub unique: bool,
    /// Custom field.
    #[serde(default)]
    pub custom: bool,
    /// Reference targets.
    #[serde(default)]
    pub reference_to: Vec<String>,
    /// Picklist values.
    #[serde(default)]
    pub picklist: Vec<String>,
    /// Restricted picklist.
    #[serde(default)]
    pub restricted: bool,
}

/// What a user may do with an object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectAccess {
    /// Create records.
    pub create: bool,
    /// Read records.
    pub read: bool,
    /// Edit records.
    pub edit: bool,
    /// Delete records.
    pub delete: bool,
    /// "View All": read every record of the object, whatever its sharing.
    pub view_all: bool,
    /// "Modify All": read, edit and delete every record of the object, whatever its sharing.
    pub modify_all: bool,
}

/// What a user may do with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FieldAccess {
    /// Invisible.
    None,
    /// Visible, read-only.
    Read,
    /// Visible and writable.
    Edit,
}

/// Fields every object has; read-only to everyone.
pub const SYSTEM_FIELDS: &[(&str, &str, &str)] = &[
    ("Id", "Record ID", "id"),
    ("CreatedDate", "Created Date", "datetime"),
    ("LastModifiedDate", "Last Modified Date", "datetime"),
    ("CreatedById", "Created By ID", "reference"),
    ("LastModifiedById", "Last Modified By ID", "reference"),
];

impl OrgSpec {
    /// Parses an org file (TOML, or JSON when it starts with `{`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut spec: Self = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            toml::from_str(text).map_err(|e| e.to_string())?
        };
        spec.check()?;
        spec.set_shared_activities(spec.org.shared_activities);
        Ok(spec)
    }

    /// Turns Shared Activities on or off (see [`OrgSettings::shared_activities`]): the
    /// [`SHARED_ACTIVITY_FIELDS`] of `EventRelation` leave its fields, or come back. Records
    /// keep what they hold; a field the org does not have is neither written nor read.
    pub fn set_shared_activities(&mut self, on: bool) {
        self.org.shared_activities = on;
        let Some(relation) = self
            .sobjects
            .iter_mut()
            .find(|o| o.name.eq_ignore_ascii_case("EventRelation"))
        else {
            return;
        };
        if on {
            relation.fields.append(&mut self.shared_activity_fields);
        } else {
            let (aside, kept) = std::mem::take(&mut relation.fields)
                .into_iter()
                .partition(|f| SHARED_ACTIVITY_FIELDS.contains(&f.name.as_str()));
            relation.fields = kept;
            self.shared_activity_fields.extend::<Vec<FieldSpec>>(aside);
        }
    }

    /// The built-in demo org.
    pub fn demo() -> Self {
        Self::parse(DEMO_ORG_TOML).expect("the built-in demo org parses")
    }

    fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for object in &self.sobjects {
            if object.key_prefix.len() != 3 {
                problems.push(format!(
                    "{}: key_prefix must have 3 characters",
                    object.name
                ));
            }
        }
        for user in &self.users {
            for set in &user.permission_sets {
                if !self.permission_sets.iter().any(|p| &p.name == set) {
                    problems.push(format!(
                        "user {}: unknown permission set {set}",
                        user.username
                    ));
                }
            }
        }
        for app in &self.connected_apps {
            for name in app.run_as.iter().chain(&app.pre_authorized) {
                if self.user(name).is_none() {
                    problems.push(format!("connected app {}: unknown user {name}", app.name));
                }
            }
        }
        for rule in &self.sharing_rules {
            if self.sobject(&rule.sobject).is_none() {
                problems.push(format!("sharing rule: unknown sObject {}", rule.sobject));
            }
            if self.user(&rule.shared_with).is_none() {
                problems.push(format!("sharing rule: unknown user {}", rule.shared_with));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// The user with this username.
    pub fn user(&self, username: &str) -> Option<&UserSpec> {
        self.users
            .iter()
            .find(|u| u.username.eq_ignore_ascii_case(username))
    }

    /// Whether `username` may sign in from `peer` through `app`: a connected app that relaxes
    /// IP restrictions admits any address; otherwise the user's profile Login IP Ranges, when
    /// it has any, must contain it.
    pub fn login_ip_allowed(
        &self,
        app: &ConnectedApp,
        username: &str,
        peer: std::net::IpAddr,
    ) -> bool {
        if app.ip_relaxation == IpRelaxation::Relax {
            return true;
        }
        let ranges = self
            .user(username)
            .and_then(|u| u.profile.as_deref())
            .and_then(|name| self.profiles.iter().find(|p| p.name == name))
            .map(|p| p.login_ip_ranges.as_slice())
            .unwrap_or_default();
        ranges.is_empty() || ranges.iter().any(|r| r.contains(peer))
    }

    /// Sets a profile's Login IP Ranges (the `/__emulator/org` endpoint).
    pub fn set_login_ip_ranges(
        &mut self,
        profile: &str,
        ranges: Vec<IpRange>,
    ) -> Result<(), String> {
        let profile = self
            .profiles
            .iter_mut()
            .find(|p| p.name == profile)
            .ok_or_else(|| format!("no profile {profile:?}"))?;
        profile.login_ip_ranges = ranges;
        Ok(())
    }

    /// Sets a connected app's IP Relaxation (the `/__emulator/org` endpoint).
    pub fn set_ip_relaxation(&mut self, app: &str, relaxation: IpRelaxation) -> Result<(), String> {
        let app = self
            .connected_apps
            .iter_mut()
            .find(|a| a.name == app)
            .ok_or_else(|| format!("no connected app {app:?}"))?;
        app.ip_relaxation = relaxation;
        Ok(())
    }

    /// Activates or deactivates a user (the `/__emulator/org` endpoint).
    pub fn set_user_active(&mut self, username: &str, active: bool) -> Result<(), String> {
        let user = self
            .users
            .iter_mut()
            .find(|u| u.username.eq_ignore_ascii_case(username))
            .ok_or_else(|| format!("no user {username:?}"))?;
        user.active = active;
        Ok(())
    }

    /// The sObject with this name (case-insensitive).
    pub fn sobject(&self, name: &str) -> Option<&SObjectSpec> {
        self.sobjects
            .iter()
            .find(|o| o.name.eq_ignore_ascii_case(name))
    }

    /// The sObject whose ids start with this prefix.
    pub fn sobject_by_prefix(&self, prefix: &str) -> Option<&SObjectSpec> {
        self.sobjects.iter().find(|o| o.key_prefix == prefix)
    }

    fn user_sets<'a>(&'a self, user: &'a UserSpec) -> impl Iterator<Item = &'a PermissionSet> {
        user.permission_sets
            .iter()
            .filter_map(|name| self.permission_sets.iter().find(|p| &p.name == name))
    }

    /// Object permissions: the union over the user's permission sets. EventRelation has no
    /// permissions of its own: it follows Event's ("Edit Events" lets a user add invitees).
    pub fn object_access(&self, user: &UserSpec, sobject: &str) -> ObjectAccess {
        let sobject = if sobject.eq_ignore_ascii_case("EventRelation") {
            "Event"
        } else {
            sobject
        };
        let mut access = ObjectAccess::default();
        for set in self.user_sets(user) {
            let Some(letters) = set
                .objects
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(sobject))
                .map(|(_, letters)| letters)
            else {
                continue;
            };
            let has = |letter: u8| letters.bytes().any(|b| b.eq_ignore_ascii_case(&letter));
            // Salesforce grants Modify All only with Read, Edit, Delete and View All.
            let modify_all = has(b'M');
            access.create |= has(b'C');
            access.read |= has(b'R') || !letters.is_empty();
            access.edit |= has(b'U') || modify_all;
            access.delete |= has(b'D') || modify_all;
            access.view_all |= has(b'V') || modify_all;
            access.modify_all |= modify_all;
        }
        access
    }

    /// Record-level security: what `user` (whose User Id is `user_id`) may do with a record of
    /// `sobject` owned by `owner_id`. The most any source grants: ownership, Modify All / View
    /// All, the org-wide default, a sharing rule. Objects without owners are not shared.
    /// <https://help.salesforce.com/s/articleView?id=sf.security_data_access.htm>
    pub fn record_access(
        &self,
        user: &UserSpec,
        user_id: &str,
        sobject: &SObjectSpec,
        owner_id: Option<&str>,
    ) -> RecordAccess {
        let access = self.object_access(user, &sobject.name);
        if !access.read {
            return RecordAccess::None;
        }
        if !sobject.has_owner() || owner_id == Some(user_id) || access.modify_all {
            return RecordAccess::Edit;
        }
        let by_default = match sobject.sharing_model {
            SharingModel::Private => RecordAccess::None,
            SharingModel::Read => RecordAccess::Read,
            SharingModel::ReadWrite => RecordAccess::Edit,
        };
        let by_view_all = if access.view_all {
            RecordAccess::Read
        } else {
            RecordAccess::None
        };
        let by_rule = self
            .sharing_rules
            .iter()
            .filter(|r| {
                r.sobject.eq_ignore_ascii_case(&sobject.name)
                    && r.shared_with.eq_ignore_ascii_case(&user.username)
            })
            .map(|r| r.access_level)
            .max()
            .unwrap_or(RecordAccess::None);
        by_default.max(by_view_all).max(by_rule)
    }

    /// Sets an object's org-wide default (the `/__emulator/org` endpoint).
    pub fn set_sharing_model(&mut self, sobject: &str, model: SharingModel) -> Result<(), String> {
        let object = self
            .sobjects
            .iter_mut()
            .find(|o| o.name.eq_ignore_ascii_case(sobject))
            .ok_or_else(|| format!("unknown sObject {sobject}"))?;
        object.sharing_model = model;
        Ok(())
    }

    /// Adds a sharing rule (the `/__emulator/org` endpoint).
    pub fn add_sharing_rule(&mut self, rule: SharingRule) -> Result<(), String> {
        if self.sobject(&rule.sobject).is_none() {
            return Err(format!("unknown sObject {}", rule.sobject));
        }
        if self.user(&rule.shared_with).is_none() {
            return Err(format!("unknown user {}", rule.shared_with));
        }
        self.sharing_rules.push(rule);
        Ok(())
    }

    /// Field-level security: system and required fields are always editable (Salesforce does not
    /// let an admin remove access to them); the rest as the permission sets grant.
    pub fn field_access(&self, user: &UserSpec, sobject: &str, field: &FieldSpec) -> FieldAccess {
        if !self.object_access(user, sobject).read {
            return FieldAccess::None;
        }
        self.field_level_access(user, sobject, field)
    }

    /// [`OrgSpec::field_access`] for a caller that already knows `user` can read `sobject`
    /// (a write checks that once, not once per field).
    pub fn field_level_access(
        &self,
        user: &UserSpec,
        sobject: &str,
        field: &FieldSpec,
    ) -> FieldAccess {
        // EventRelation's fields are not under field-level security.
        if !field.nillable || sobject.eq_ignore_ascii_case("EventRelation") {
            return FieldAccess::Edit;
        }
        let mut key = String::with_capacity(sobject.len() + 1 + field.name.len());
        key.push_str(sobject);
        key.push('.');
        key.push_str(&field.name);
        key.make_ascii_lowercase();
        self.user_sets(user)
            .filter_map(|set| {
                set.fields.get(&key).map(|access| match access.as_str() {
                    "edit" => FieldAccess::Edit,
                    "read" => FieldAccess::Read,
                    _ => FieldAccess::None,
                })
            })
            .max()
            .unwrap_or(FieldAccess::None)
    }

    /// Sets one permission (the `/__emulator/org` endpoint). `access` is `CRUD` letters for an
    /// object, `edit` / `read` / `none` for a field.
    pub fn set_permission(
        &mut self,
        permission_set: &str,
        object: Option<&str>,
        field: Option<&str>,
        access: &str,
    ) -> Result<(), String> {
        let set = self
            .permission_sets
            .iter_mut()
            .find(|p| p.name == permission_set)
            .ok_or_else(|| format!("unknown permission set {permission_set}"))?;
        match (object, field) {
            (Some(object), None) => {
                set.objects.insert(object.to_owned(), access.to_owned());
            }
            (None, Some(field)) => {
                if !matches!(access, "edit" | "read" | "none") {
                    return Err("field access is edit, read or none".into());
                }
                set.grant_field(field, access);
            }
            _ => return Err("name exactly one of object or field".into()),
        }
        Ok(())
    }

    /// The describe of `sobject` as `user` sees it, or None when the user cannot read it.
    pub fn describe_for(&self, user: &UserSpec, sobject: &SObjectSpec) -> Option<SObjectDescribe> {
        let access = self.object_access(user, &sobject.name);
        if !access.read {
            return None;
        }
        let mut fields: Vec<FieldDescribe> = SYSTEM_FIELDS
            .iter()
            .map(|(name, label, field_type)| FieldDescribe {
                name: (*name).to_owned(),
                label: (*label).to_owned(),
                field_type: (*field_type).to_owned(),
                length: if *field_type == "id" { 18 } else { 0 },
                nillable: *name != "Id",
                createable: false,
                updateable: false,
                defaulted_on_create: true,
                external_id: false,
                unique: false,
                custom: false,
                reference_to: if *field_type == "reference" {
                    vec!["User".into()]
                } else {
                    vec![]
                },
                picklist_values: vec![],
                restricted_picklist: false,
            })
            .collect();
        for field in &sobject.fields {
            let fls = self.field_access(user, &sobject.name, field);
            if fls == FieldAccess::None {
                continue;
            }
            let editable = fls == FieldAccess::Edit;
            fields.push(FieldDescribe {
                name: field.name.clone(),
                label: field.label.clone(),
                field_type: field.field_type.clone(),
                length: field.length,
                nillable: field.nillable,
                createable: field.createable && editable && access.create,
                updateable: field.updateable && editable && access.edit,
                defaulted_on_create: field.defaulted_on_create,
                external_id: field.external_id,
                unique: field.unique,
                custom: field.custom,
                reference_to: field.reference_to.clone(),
                picklist_values: field
                    .picklist
                    .iter()
                    .map(|v| PicklistValue {
                        value: v.clone(),
                        label: v.clone(),
                        active: true,
                        default_value: false,
                    })
                    .collect(),
                restricted_picklist: field.restricted,
            });
        }
        Some(SObjectDescribe {
            name: sobject.name.clone(),
            label: sobject.label.clone(),
            key_prefix: Some(sobject.key_prefix.clone()),
            custom: sobject.custom,
            createable: access.create,
            updateable: access.edit,
            deletable: access.delete,
            queryable: access.read,
            fields,
        })
    }

    /// describeGlobal entries for `user`.
    pub fn global_for(&self, user: &UserSpec) -> Vec<GlobalSObject> {
        self.sobjects
            .iter()
            .filter_map(|o| {
                let access = self.object_access(user, &o.name);
                access.read.then(|| GlobalSObject {
                    name: o.name.clone(),
                    label: o.label.clone(),
                    key_prefix: Some(o.key_prefix.clone()),
                    custom: o.custom,
                    createable: access.create,
                    updateable: access.edit,
                    deletable: access.delete,
                    queryable: access.read,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_org_permissions() {
        let org = OrgSpec::demo();
        let integration = org.user("integration@bookme-demo.example").unwrap();
        let limited = org.user("limited@bookme-demo.example").unwrap();
        let lead = org.sobject("Lead").unwrap();
        let phone = lead.fields.iter().find(|f| f.name == "Phone").unwrap();
        let last_name = lead.fields.iter().find(|f| f.name == "LastName").unwrap();
        assert_eq!(
            org.field_access(integration, "Lead", phone),
            FieldAccess::Edit
        );
        assert_eq!(org.field_access(limited, "Lead", phone), FieldAccess::None);
        assert_eq!(
            org.field_access(limited, "Lead", last_name),
            FieldAccess::Edit
        );
        let describe = org.describe_for(limited, lead).unwrap();
        assert!(describe.field("Phone").is_none());
        assert!(describe.field("Email").unwrap().createable);
        assert!(!org.object_access(limited, "Event").delete);
        let contact = org.sobject("Contact").unwrap();
        assert!(org.describe_for(limited, contact).is_none());
    }

    #[test]
    fn field_permissions_are_found_whatever_the_case_of_either_name() {
        let mut org = OrgSpec::demo();
        let limited = org.user("limited@bookme-demo.example").unwrap().clone();
        let lead = org.sobject("Lead").unwrap().clone();
        let phone = lead.fields.iter().find(|f| f.name == "Phone").unwrap();
        let set = &limited.permission_sets[0];
        org.set_permission(set, None, Some("LEAD.phone"), "read")
            .unwrap();
        assert_eq!(org.field_access(&limited, "lead", phone), FieldAccess::Read);
        assert_eq!(org.field_access(&limited, "Lead", phone), FieldAccess::Read);
        let loaded: PermissionSet =
            toml::from_str("name = \"X\"\n[fields]\n\"Lead.EMAIL\" = \"edit\"\n").unwrap();
        assert_eq!(loaded.field_permissions()["lead.email"], "edit");
    }

    #[test]
    fn record_access_follows_owner_defaults_rules_and_modify_all() {
        let mut org = OrgSpec::demo();
        let integration = org.user("integration@bookme-demo.example").unwrap().clone();
        let lead = |org: &OrgSpec| org.sobject("Lead").unwrap().clone();
        let access = |org: &OrgSpec, owner| {
            org.record_access(&integration, "005me", &lead(org), Some(owner))
        };
        assert_eq!(
            access(&org, "005other"),
            RecordAccess::Edit,
            "demo: Public Read/Write"
        );
        org.set_sharing_model("Lead", SharingModel::Read).unwrap();
        assert_eq!(access(&org, "005other"), RecordAccess::Read);
        org.set_sharing_model("Lead", SharingModel::Private)
            .unwrap();
        assert_eq!(access(&org, "005other"), RecordAccess::None);
        assert_eq!(access(&org, "005me"), RecordAccess::Edit, "its own record");
        org.set_permission("BookMe_Integration_User", Some("Lead"), None, "CRUV")
            .unwrap();
        assert_eq!(access(&org, "005other"), RecordAccess::Read, "View All");
        org.set_permission("BookMe_Integration_User", Some("Lead"), None, "CRUM")
            .unwrap();
        assert_eq!(access(&org, "005other"), RecordAccess::Edit, "Modify All");
        assert!(org.object_access(&integration, "Lead").delete);
        org.set_permission("BookMe_Integration_User", Some("Lead"), None, "CRU")
            .unwrap();
        org.add_sharing_rule(SharingRule {
            sobject: "Lead".into(),
            shared_with: integration.username.clone(),
            access_level: RecordAccess::Edit,
        })
        .unwrap();
        assert_eq!(access(&org, "005other"), RecordAccess::Edit, "sharing rule");
        let user = org.sobject("User").unwrap().clone();
        assert_eq!(
            org.record_access(&integration, "005me", &user, None),
            RecordAccess::Edit,
            "objects without owners are not shared"
        );
    }

    #[test]
    fn unknown_permission_set_is_reported() {
        let text = DEMO_ORG_TOML.replace(
            "permission_sets = [\"BookMe_Limited\"]",
            "permission_sets = [\"Nope\"]",
        );
        let error = OrgSpec::parse(&text).unwrap_err();
        assert!(error.contains("unknown permission set Nope"), "{error}");
    }
}
