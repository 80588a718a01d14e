//! Org settings a tenant's data can meet: where a mapped field's values depend on a setting of
//! the org that the API does not report, a warning saying what the booking then does. Pure:
//! the mapping and the describes in, warnings out (for `mapping validate` and `doctor`).
//!
//! | setting (Setup) | what the API refuses when it is off | what a booking does |
//! |---|---|---|
//! | Email Address Internationalization (on in orgs created since Summer '20) | a non-ASCII address in an Email field: 400 `INVALID_EMAIL_ADDRESS` "`<label>`: invalid email address: `<value>`" | the domain is written punycoded; a non-ASCII local part as the record's `invalid_value` says (`drop` / `fail`) |
//! | Activity Settings → Enable Multiday Events | an Event over 1440 minutes (14 days when on): `FIELD_INTEGRITY_EXCEPTION` "Duration must be between 0 and 1440 minutes: Duration" | dead-lettered `salesforce_field_integrity_exception` |
//!
//! Sources: <https://help.salesforce.com/s/articleView?id=sales.emailadmin_eai_set_up.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_event.htm>.

use std::collections::HashMap;

use crate::config::{Action, InvalidValue, TenantConfig};
use crate::salesforce::model::SObjectDescribe;

/// One warning: the mapped field, the setting and what happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgSettingWarning {
    /// `Object.Field`.
    pub target: String,
    /// The org setting (as Setup names it).
    pub setting: &'static str,
    /// What a booking meets, and does.
    pub detail: String,
}

impl std::fmt::Display for OrgSettingWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.target, self.setting, self.detail)
    }
}

/// The warnings for `tenant`'s mapping, given the describes of its objects (objects without a
/// describe are skipped: the mapping check reports them).
pub fn warnings(
    tenant: &TenantConfig,
    describes: &HashMap<String, SObjectDescribe>,
) -> Vec<OrgSettingWarning> {
    let mut found = Vec::new();
    for record in tenant.records.iter().filter(|r| r.action == Action::Upsert) {
        let Some(describe) = describes.get(&record.sobject) else {
            continue;
        };
        for name in record.fields.keys() {
            let Some(field) = describe.field(name) else {
                continue;
            };
            let target = format!("{}.{}", record.sobject, field.name);
            if field.field_type == "email" {
                let treatment = record
                    .invalid_value_fields
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map_or(record.invalid_value, |(_, t)| *t);
                let local = match treatment {
                    InvalidValue::Drop => {
                        "the record is written without the field, counted in \
                         portals_crm_refused_values_total{treatment=\"dropped\"}"
                    }
                    InvalidValue::Fail => {
                        "the booking is dead-lettered as salesforce_invalid_email_address"
                    }
                };
                found.push(OrgSettingWarning {
                    target,
                    setting: "Email Address Internationalization",
                    detail: format!(
                        "if it is off, non-ASCII addresses are refused: an internationalized \
                         domain is written punycoded; a non-ASCII local part (josé@…): {local} \
                         (invalid_value = \"{}\")",
                        match treatment {
                            InvalidValue::Drop => "drop",
                            InvalidValue::Fail => "fail",
                        }
                    ),
                });
            } else if record.sobject == "Event" && field.name == "EndDateTime" {
                found.push(OrgSettingWarning {
                    target,
                    setting: "Enable Multiday Events",
                    detail: "if it is off, a booking longer than a day (1440 minutes; 14 days \
                             when on) is refused with FIELD_INTEGRITY_EXCEPTION and \
                             dead-lettered as salesforce_field_integrity_exception"
                        .into(),
                });
            }
        }
    }
    found
}
