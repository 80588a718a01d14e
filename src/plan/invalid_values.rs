//! Field values the org refuses although the mapping rendered them, repaired so that one field
//! does not cost the whole booking. Pure: the refused graph and its nodes in, the nodes to send
//! again out.
//!
//! The kind: an Email field of an org without Email Address Internationalization takes ASCII
//! addresses only and refuses the rest with `INVALID_EMAIL_ADDRESS` "`<label>`: invalid email
//! address: `<value>`", fields `[<name>]`, which rolls back the whole graph
//! (<https://help.salesforce.com/s/articleView?id=sales.emailadmin_eai_set_up.htm>). An
//! internationalized domain has an ASCII form every org takes, its IDNA (punycode) form
//! (`ann@bücher.example` → `ann@xn--bcher-kva.example`, RFC 5891); a non-ASCII local part
//! (`josé@…`) has none, so it gets what the mapping's `invalid_value` says: dropped from the
//! record, or the booking fails. The org names the field it refused, so nothing here depends on
//! knowing the field types or the org's setting in advance.

use serde_json::Value;

use super::CompiledMapping;
use crate::config::InvalidValue;
use crate::salesforce::model::{GraphResult, Subrequest};

/// Error codes whose refused value this module can repair.
pub const REPAIRABLE: &[&str] = &["INVALID_EMAIL_ADDRESS"];

/// What was done to one refused value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// The graph node (`lead_0`).
    pub reference_id: String,
    /// The field the org named.
    pub field: String,
    /// The org's error code.
    pub error_code: String,
    /// `punycoded` or `dropped` (the `treatment` label of `portals_crm_refused_values_total`).
    pub treatment: &'static str,
}

/// The address with its domain in IDNA ASCII form, when that differs from `address` and the
/// local part is ASCII (a non-ASCII local part has no ASCII form, so punycoding the domain
/// would not make the address acceptable).
pub fn punycode_domain(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    if !local.is_ascii() || domain.is_ascii() {
        return None;
    }
    let ascii = idna::domain_to_ascii(domain).ok()?;
    Some(format!("{local}@{ascii}"))
}

/// The nodes to send again after `result` refused a value the mapping lets be repaired, and
/// what was repaired; `None` when the refusal is of another kind, or the mapping says `fail`
/// for the field (the booking then fails with the org's error, naming the field).
pub fn repair(
    result: &GraphResult,
    nodes: &[Subrequest],
    mapping: &CompiledMapping,
) -> Option<(Vec<Subrequest>, Vec<Repair>)> {
    let (reference_id, error) = result.node_error_of(REPAIRABLE)?;
    if error.fields.is_empty() {
        return None;
    }
    let mut repaired = nodes.to_vec();
    let body = repaired
        .iter_mut()
        .find(|n| n.reference_id == reference_id)?
        .body
        .as_mut()?
        .object_mut()?;
    let mut repairs = Vec::new();
    for field in &error.fields {
        let value = body.get(field)?.as_str()?;
        let treatment = if let Some(ascii) = punycode_domain(value) {
            body.insert(field.clone(), Value::String(ascii));
            "punycoded"
        } else {
            match mapping.invalid_value_for(&reference_id, field) {
                InvalidValue::Fail => return None,
                InvalidValue::Drop => {
                    body.remove(field);
                    "dropped"
                }
            }
        };
        repairs.push(Repair {
            reference_id: reference_id.clone(),
            field: field.clone(),
            error_code: error.error_code.clone(),
            treatment,
        });
    }
    Some((repaired, repairs))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::TenantConfig;

    fn mapping(extra: &str) -> CompiledMapping {
        let text = format!(
            r#"
[org]
login_url = "http://127.0.0.1:1"
[auth]
flow = "client_credentials"
client_id = "x"
client_secret_env = "X"
[[records]]
ref = "lead"
sobject = "Lead"
for_each = "attendees"
external_id_field = "Key__c"
external_id = "{{{{ attendee.email }}}}"
{extra}
[records.fields]
LastName = "{{{{ attendee.last_name }}}}"
Email = "{{{{ attendee.email }}}}"
"#
        );
        let tenant: TenantConfig = toml::from_str(&text).unwrap();
        CompiledMapping::compile(&tenant).unwrap()
    }

    fn refused(value: &str) -> (GraphResult, Vec<Subrequest>) {
        let nodes = vec![Subrequest {
            method: "PATCH".into(),
            url: "/services/data/v66.0/sobjects/Lead/Key__c/k".into(),
            reference_id: "lead_1".into(),
            body: Some(json!({"LastName": "Doe", "Email": value}).into()),
        }];
        let result: GraphResult = serde_json::from_str(&json!({
            "graphId": "g",
            "isSuccessful": false,
            "graphResponse": {"compositeResponse": [{
                "body": [{"errorCode": "INVALID_EMAIL_ADDRESS", "message": format!("Email: invalid email address: {value}"), "fields": ["Email"]}],
                "httpHeaders": {}, "httpStatusCode": 400, "referenceId": "lead_1"
            }]}
        }).to_string())
        .unwrap();
        (result, nodes)
    }

    #[test]
    fn an_internationalized_domain_is_punycoded() {
        assert_eq!(
            punycode_domain("ann@bücher.example").as_deref(),
            Some("ann@xn--bcher-kva.example")
        );
        assert_eq!(punycode_domain("josé@bücher.example"), None);
        assert_eq!(punycode_domain("ann@example.org"), None);
        let (result, nodes) = refused("ann@bücher.example");
        let (nodes, repairs) = repair(&result, &nodes, &mapping("")).unwrap();
        assert_eq!(
            nodes[0].body.as_ref().unwrap().value()["Email"],
            "ann@xn--bcher-kva.example"
        );
        assert_eq!(repairs[0].treatment, "punycoded");
    }

    #[test]
    fn a_non_ascii_local_part_is_dropped_or_fails_as_the_mapping_says() {
        let (result, nodes) = refused("josé@example.org");
        let (fixed, repairs) = repair(&result, &nodes, &mapping("")).unwrap();
        assert_eq!(
            *fixed[0].body.as_ref().unwrap().value(),
            json!({"LastName": "Doe"})
        );
        assert_eq!(
            (repairs[0].field.as_str(), repairs[0].treatment),
            ("Email", "dropped")
        );
        assert!(repair(&result, &nodes, &mapping(r#"invalid_value = "fail""#)).is_none());
        let per_field = "invalid_value_fields = { email = \"fail\" }";
        assert!(repair(&result, &nodes, &mapping(per_field)).is_none());
    }

    #[test]
    fn a_punycoded_address_refused_again_gets_the_mapping_treatment() {
        let (result, nodes) = refused("ann@xn--bcher-kva");
        let (fixed, _) = repair(&result, &nodes, &mapping("")).unwrap();
        assert!(
            fixed[0]
                .body
                .as_ref()
                .unwrap()
                .value()
                .get("Email")
                .is_none()
        );
    }
}
