//! Which dead letters a newer version already superseded, as the org shows it: the version the
//! org holds for each booking, asked with one SOQL query per group of dead letters
//! (`WHERE key IN (…)`), so a dead letter is marked even when this worker's ledger never saw
//! the newer write (a fresh cache, another worker).
//!
//! Where the version is kept comes from the tenant's mapping, not from a fixed name: the record
//! written once per booking (no `for_each`), keyed by `{{ booking.booking_id }}`, with a field
//! rendered from `{{ booking.version }}` — in the shipped mapping
//! `BookMe__Booking__c.BookMe__Version__c` by `BookMe__Booking_Id__c`, the record whose
//! validation rule (`BookMe_Version_Must_Not_Decrease`) rolls back a stale graph. A mapping
//! without such a record is not asked about (the ledger still is).
//!
//! SOQL limits a statement to 100,000 characters and the REST query URL to about 16,000
//! (<https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_limits.htm>),
//! so a large group is asked in chunks of [`CHUNK`] booking ids.

use std::collections::HashMap;

use serde_json::Value;

use crate::config::{Action, TenantConfig};
use crate::enrich::soql_quote;
use crate::salesforce::{SalesforceClient, SalesforceError};

/// Booking ids per query: 100 ids of up to 80 characters keep the URL under Salesforce's limit.
pub const CHUNK: usize = 100;

/// Where the org keeps a booking's version, per the tenant's mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionTarget {
    /// The sObject (`BookMe__Booking__c`).
    pub sobject: String,
    /// Its external id field keyed by the booking id (`BookMe__Booking_Id__c`).
    pub key_field: String,
    /// The field written from `booking.version` (`BookMe__Version__c`).
    pub version_field: String,
}

/// The expression of a template that is one `{{ expression }}`, without spaces.
fn sole_expression(template: &str) -> Option<String> {
    let inner = template
        .trim()
        .strip_prefix("{{")?
        .strip_suffix("}}")?
        .trim();
    (!inner.contains("{{") && !inner.contains("{%"))
        .then(|| inner.chars().filter(|c| !c.is_whitespace()).collect())
}

impl VersionTarget {
    /// The record of `config` that holds the booking's version, if the mapping has one.
    pub fn of(config: &TenantConfig) -> Option<Self> {
        config.records.iter().find_map(|record| {
            if record.for_each.is_some()
                || record.action != Action::Upsert
                || sole_expression(&record.external_id).as_deref() != Some("booking.booking_id")
            {
                return None;
            }
            let version_field = record.fields.iter().find_map(|(name, value)| {
                let template = value.as_str()?;
                (sole_expression(template).as_deref() == Some("booking.version"))
                    .then(|| name.clone())
            })?;
            Some(Self {
                sobject: record.sobject.clone(),
                key_field: record.external_id_field.clone(),
                version_field,
            })
        })
    }

    /// The query for the versions of `booking_ids`.
    pub fn soql(&self, booking_ids: &[&str]) -> String {
        let keys: Vec<String> = booking_ids.iter().map(|id| soql_quote(id)).collect();
        format!(
            "SELECT {key}, {version} FROM {sobject} WHERE {key} IN ({keys})",
            key = self.key_field,
            version = self.version_field,
            sobject = self.sobject,
            keys = keys.join(", ")
        )
    }

    /// The versions of the rows a query answered, by booking id. A Number field comes back as a
    /// JSON number (`3` or `3.0`); a row without a version is left out.
    fn versions(&self, rows: &[serde_json::Map<String, Value>]) -> HashMap<String, u64> {
        rows.iter()
            .filter_map(|row| {
                let key = row.get(&self.key_field)?.as_str()?.to_owned();
                let version = match row.get(&self.version_field)? {
                    Value::Number(n) => n.as_u64().or_else(|| {
                        n.as_f64()
                            .filter(|v| *v >= 0.0 && v.fract() == 0.0)
                            .map(|v| v as u64)
                    })?,
                    Value::String(s) => s.trim().parse().ok()?,
                    _ => return None,
                };
                Some((key, version))
            })
            .collect()
    }
}

/// The version the org holds for each of `booking_ids` that it has, asked in chunks of
/// [`CHUNK`]. `Err` when the org could not be asked (or the user cannot read the field).
pub async fn org_versions(
    client: &SalesforceClient,
    target: &VersionTarget,
    booking_ids: &[&str],
) -> Result<HashMap<String, u64>, SalesforceError> {
    let mut found = HashMap::new();
    for chunk in booking_ids.chunks(CHUNK) {
        let rows = client.query(&target.soql(chunk)).await?;
        found.extend(target.versions(&rows));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme() -> TenantConfig {
        toml::from_str(include_str!("../../config/tenants/acme.toml")).unwrap()
    }

    #[test]
    fn the_version_target_comes_from_the_mapping() {
        assert_eq!(
            VersionTarget::of(&acme()),
            Some(VersionTarget {
                sobject: "BookMe__Booking__c".into(),
                key_field: "BookMe__Booking_Id__c".into(),
                version_field: "BookMe__Version__c".into(),
            })
        );
    }

    #[test]
    fn a_mapping_elsewhere_is_followed_and_one_without_a_version_is_not_asked() {
        let mut config = acme();
        let booking = config
            .records
            .iter_mut()
            .find(|r| r.sobject == "BookMe__Booking__c")
            .unwrap();
        booking.sobject = "Booking__c".into();
        let version = booking.fields.remove("BookMe__Version__c").unwrap();
        booking.fields.insert("Rev__c".into(), version);
        booking.external_id = "{{booking.booking_id}}".into();
        let target = VersionTarget::of(&config).unwrap();
        assert_eq!(
            (target.sobject.as_str(), target.version_field.as_str()),
            ("Booking__c", "Rev__c")
        );
        let booking = config
            .records
            .iter_mut()
            .find(|r| r.sobject == "Booking__c")
            .unwrap();
        booking.fields.remove("Rev__c");
        assert_eq!(VersionTarget::of(&config), None);
    }

    #[test]
    fn one_query_names_every_booking_quoted() {
        let target = VersionTarget::of(&acme()).unwrap();
        assert_eq!(
            target.soql(&["bk_1", "o'brien"]),
            "SELECT BookMe__Booking_Id__c, BookMe__Version__c FROM BookMe__Booking__c \
             WHERE BookMe__Booking_Id__c IN ('bk_1', 'o\\'brien')"
        );
    }

    #[test]
    fn versions_are_read_as_salesforce_returns_numbers() {
        let target = VersionTarget::of(&acme()).unwrap();
        let rows: Vec<serde_json::Map<String, Value>> = serde_json::from_str(
            r#"[{"attributes":{"type":"BookMe__Booking__c"},"BookMe__Booking_Id__c":"bk_1","BookMe__Version__c":3.0},
                {"BookMe__Booking_Id__c":"bk_2","BookMe__Version__c":2},
                {"BookMe__Booking_Id__c":"bk_3","BookMe__Version__c":null}]"#,
        )
        .unwrap();
        let versions = target.versions(&rows);
        assert_eq!(versions.get("bk_1"), Some(&3));
        assert_eq!(versions.get("bk_2"), Some(&2));
        assert_eq!(versions.get("bk_3"), None);
    }
}
