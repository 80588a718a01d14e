//! Validates a tenant's mapping against each sObject's describe *as the integration user sees
//! it*: the problems a write would hit in production, found before go-live, each with the fix
//! the Salesforce admin has to make.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use crate::config::TenantConfig;
use crate::salesforce::model::{FieldDescribe, SObjectDescribe};

/// One problem of a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MappingProblem {
    /// Tenant.
    pub tenant: String,
    /// The mapping record (`ref`).
    pub record: String,
    /// `Object.Field` (or the object alone).
    pub target: String,
    /// What is wrong.
    pub problem: String,
    /// What the Salesforce admin or the mapping author should do.
    pub fix: String,
}

impl MappingProblem {
    /// The field of the record the problem is about (`Phone` of `Lead.Phone`; also `when`,
    /// `external_id`, `ref`, …), or None for the record as a whole.
    pub fn field(&self) -> Option<&str> {
        self.target.split_once('.').map(|(_, field)| field)
    }
}

impl std::fmt::Display for MappingProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.record.is_empty() {
            return write!(
                f,
                "tenant {}: {} — fix: {}",
                self.tenant, self.problem, self.fix
            );
        }
        write!(
            f,
            "tenant {}, record {}, {}: {} — fix: {}",
            self.tenant, self.record, self.target, self.problem, self.fix
        )
    }
}

fn text_type(field_type: &str) -> bool {
    matches!(
        field_type,
        "string" | "textarea" | "email" | "phone" | "url" | "picklist" | "combobox" | "id"
    )
}

/// Problems of a value for a field (a constant of the mapping, or a value the preview rendered):
/// type, length, restricted picklist, null in a required field.
pub fn constant_problem(field: &FieldDescribe, value: &Value) -> Option<String> {
    match (field.field_type.as_str(), value) {
        (_, Value::Null) if !field.nillable => Some("is required and set to null".into()),
        (t, Value::String(s)) if text_type(t) => {
            if field.length > 0 && s.chars().count() > field.length as usize {
                return Some(format!(
                    "constant is {} characters, the field holds {}",
                    s.chars().count(),
                    field.length
                ));
            }
            // The API accepts any value for an unrestricted picklist.
            if t == "picklist"
                && field.restricted_picklist
                && !field
                    .picklist_values
                    .iter()
                    .any(|v| v.active && v.value == *s)
            {
                let allowed: Vec<&str> = field
                    .picklist_values
                    .iter()
                    .map(|v| v.value.as_str())
                    .collect();
                return Some(format!(
                    "{s:?} is not one of the picklist values {allowed:?}"
                ));
            }
            None
        }
        ("boolean", Value::Bool(_))
        | ("double" | "int" | "currency" | "percent", Value::Number(_)) => None,
        ("datetime" | "date", Value::String(_)) | ("reference", Value::String(_)) => None,
        (t, v) => Some(format!(
            "a {} constant cannot go into a {t} field",
            json_kind(v)
        )),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "text",
        Value::Array(_) => "list",
        Value::Object(_) => "table",
    }
}

/// `@{name.id}` as a whole value: the reference's record name (without `_N`).
fn referenced_record(value: &Value) -> Option<&str> {
    let inner = value.as_str()?.strip_prefix("@{")?.strip_suffix('}')?;
    let name = inner.split('.').next()?;
    Some(name)
}

/// The fields the integration user may use, as a table for people.
pub fn fields_table(describe: &SObjectDescribe) -> String {
    use crate::telemetry::logging::terminal_safe;
    let mut out = format!(
        "{:<28} {:<24} {:<10} {:>6} {:<8} {:<6} {:<6} PICKLIST\n",
        "NAME", "LABEL", "TYPE", "LENGTH", "REQUIRED", "CREATE", "UPDATE"
    );
    for f in &describe.fields {
        let yes = |b: bool| if b { "yes" } else { "-" };
        let picklist: Vec<&str> = f.picklist_values.iter().map(|v| v.value.as_str()).collect();
        out.push_str(&format!(
            "{:<28} {:<24} {:<10} {:>6} {:<8} {:<6} {:<6} {}\n",
            terminal_safe(&f.name),
            terminal_safe(&f.label),
            terminal_safe(&f.field_type),
            f.length,
            yes(f.required_on_create()),
            yes(f.createable),
            yes(f.updateable),
            terminal_safe(&picklist.join(", "))
        ));
    }
    out
}

/// Validates `tenant`'s mapping; `describes` holds the describe of every mapped sObject the
/// integration user can see (absent = invisible). Includes the mapping's failures on the
/// built-in sample events ([`super::samples::sample_problems`]).
pub fn validate(
    tenant: &TenantConfig,
    describes: &HashMap<String, SObjectDescribe>,
) -> Vec<MappingProblem> {
    let mut problems = super::samples::sample_problems(tenant);
    let mut sobject_of: HashMap<&str, &str> = HashMap::new();
    for record in &tenant.records {
        let problem = |target: String, problem: String, fix: String| MappingProblem {
            tenant: tenant.tenant.clone(),
            record: record.reference.clone(),
            target,
            problem,
            fix,
        };
        sobject_of.insert(record.reference.as_str(), record.sobject.as_str());
        let object = record.sobject.as_str();
        let Some(describe) = describes.get(object) else {
            problems.push(problem(
                object.to_owned(),
                "the integration user cannot see this object".into(),
                format!("grant Read, Create and Edit on {object} to the integration user's permission set"),
            ));
            continue;
        };
        if !describe.createable || !describe.updateable {
            let missing: Vec<&str> = [
                ("Create", describe.createable),
                ("Edit", describe.updateable),
            ]
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(p, _)| *p)
            .collect();
            problems.push(problem(
                object.to_owned(),
                format!(
                    "upserts need Create and Edit; the integration user lacks {}",
                    missing.join(" and ")
                ),
                format!(
                    "grant {} on {object} to the integration user's permission set",
                    missing.join(" and ")
                ),
            ));
        }
        if record.action == crate::config::Action::Delete {
            if !describe.deletable {
                problems.push(problem(
                    object.to_owned(),
                    "the mapping deletes these records; the integration user lacks Delete".into(),
                    format!("grant Delete on {object} to the integration user's permission set"),
                ));
            }
            if describe
                .field(&record.external_id_field)
                .is_none_or(|f| !f.external_id)
            {
                problems.push(problem(
                    format!("{object}.{}", record.external_id_field),
                    "is not a visible External ID field, so it cannot key a delete".into(),
                    format!(
                        "mark {object}.{} as External ID and grant Read on it",
                        record.external_id_field
                    ),
                ));
            }
            continue;
        }
        match describe.field(&record.external_id_field) {
            None => problems.push(problem(
                format!("{object}.{}", record.external_id_field),
                "the external id field does not exist or is not visible".into(),
                format!(
                    "install deploy/salesforce (it creates {object}.{}) and grant Edit on it",
                    record.external_id_field
                ),
            )),
            Some(f) if !f.external_id => problems.push(problem(
                format!("{object}.{}", f.name),
                "is not an External ID field, so it cannot key an upsert".into(),
                format!(
                    "mark {object}.{} as External ID (and Unique) in Setup",
                    f.name
                ),
            )),
            Some(_) => {}
        }
        for (name, value) in &record.fields {
            let target = format!("{object}.{name}");
            let Some(field) = describe.field(name) else {
                problems.push(problem(
                    target.clone(),
                    "the field does not exist or the integration user cannot see it (field-level security)".into(),
                    format!("grant Edit on {target} to the integration user's permission set"),
                ));
                continue;
            };
            if !field.createable || !field.updateable {
                let how = match (field.createable, field.updateable) {
                    (false, false) => "neither create nor update",
                    (false, true) => "not create",
                    _ => "not update",
                };
                problems.push(problem(
                    target.clone(),
                    format!("the integration user can {how} this field (read-only)"),
                    format!("grant Edit on {target} to the integration user's permission set"),
                ));
            }
            if let Some(referenced) = referenced_record(value) {
                let base = referenced
                    .rsplit_once('_')
                    .filter(|(_, n)| n.parse::<usize>().is_ok())
                    .map_or(referenced, |(b, _)| b);
                match sobject_of.get(base) {
                    Some(target_object)
                        if field.field_type == "reference"
                            && !field.reference_to.iter().any(|t| t == target_object) =>
                    {
                        problems.push(problem(
                            target.clone(),
                            format!(
                                "refers to a {target_object}, but the field points at {:?}",
                                field.reference_to
                            ),
                            format!("map {target} to a record of {:?}", field.reference_to),
                        ));
                    }
                    _ => {}
                }
            } else if !value
                .as_str()
                .is_some_and(|s| s.contains("{{") || s.contains("{%"))
                && let Some(message) = constant_problem(field, value)
            {
                problems.push(problem(
                    target.clone(),
                    message,
                    format!("change the constant for {target}"),
                ));
            }
        }
        for field in describe.fields.iter().filter(|f| f.required_on_create()) {
            let mapped = record
                .fields
                .keys()
                .any(|k| k.eq_ignore_ascii_case(&field.name))
                || field.name.eq_ignore_ascii_case(&record.external_id_field);
            if !mapped {
                problems.push(problem(
                    format!("{object}.{}", field.name),
                    "is required on create and not mapped".into(),
                    format!("map {object}.{} in the tenant file", field.name),
                ));
            }
        }
    }
    problems.extend(parent_needs_shared_activities(tenant, describes));
    problems
}

/// `[relations]` with `parent = "first"` writes `EventRelation.IsParent`, a field that exists
/// only in an org with Shared Activities (`salesforce-api.md` §4a, from the EventRelation object
/// reference): without it every relation write and look-up would fail with `INVALID_FIELD`.
/// Checked when the describe of `EventRelation` is at hand
/// ([`TenantConfig::described_sobjects`](crate::config::TenantConfig::described_sobjects)).
fn parent_needs_shared_activities(
    tenant: &TenantConfig,
    describes: &HashMap<String, SObjectDescribe>,
) -> Option<MappingProblem> {
    let relations = tenant.relations.as_ref()?;
    if relations.parent != crate::config::Parent::First {
        return None;
    }
    let describe = describes.get("EventRelation")?;
    describe
        .field("IsParent")
        .is_none()
        .then(|| MappingProblem {
            tenant: tenant.tenant.clone(),
            record: "relations".into(),
            target: "EventRelation.IsParent".into(),
            problem: "parent = \"first\" makes the first attendee the Event's Who through \
                  EventRelation.IsParent, which this org does not have: Shared Activities is off"
                .into(),
            fix: "enable Shared Activities in Setup (Activity Settings: Allow Users to Relate \
              Multiple Contacts to Tasks and Events), or set parent = \"none\" under [relations] \
              (the attendees are then related as invitees only)"
                .into(),
        })
}
