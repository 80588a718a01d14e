//! A dead-letter group's cause, re-checked against the org as it is now, before a replay.
//!
//! | reason | asked of the org now | gone when |
//! |---|---|---|
//! | names a Salesforce field (`x-portals-sf-fields`, or `INVALID_FIELD`'s message) | the mapping check as the integration user (describes), for that field | the field passes: visible and writable |
//! | object access (`salesforce_insufficient_access_or_readonly`, `salesforce_insufficient_access`, `salesforce_invalid_type`) | the mapping check, for the object the failing record writes | the object is visible, createable and updateable |
//! | `salesforce_sharing_record_not_visible`, `salesforce_sharing_reference_not_visible` | `SELECT Id FROM <object> WHERE Id = '<the record>'` (a query runs under the user's sharing) | the record is returned |
//! | `salesforce_sharing_record_read_only` | cannot be asked: the error names no record, and edit access is per record | — |
//! | `salesforce_auth_*` (refused sign-in) | the sign-in, tried now: a describeGlobal request, which signs in again when the session is gone | the request succeeds |
//! | `circuit_open` | the tenant's circuit | closed |
//! | `unknown_tenant` | the running tenants | the tenant is configured |
//! | anything else (the event, the mapping, a passing outage, the broker, data-dependent Salesforce errors) | cannot be asked without writing: the page says so | — |
//!
//! Sharing tiers and their errors: [`crate::sharing`]. Refused sign-ins: [`crate::salesforce::signin`].

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use super::{AdminState, ProblemView};
use crate::dlq::DeadLetter;
use crate::outcome::Reason;
use crate::outcome::reason::SalesforceCode;
use crate::plan::validate::MappingProblem;
use crate::sharing::{self, SharingProblem};
use crate::tenants::{Tenant, check_against_org};

/// Salesforce error codes that, without a field, mean the integration user's object
/// permissions (Read, Create, Edit) refused the write.
const OBJECT_CODES: &[&str] = &[
    "INSUFFICIENT_ACCESS_OR_READONLY",
    "INSUFFICIENT_ACCESS",
    "INVALID_TYPE",
];

/// Where a group's cause stands now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseState {
    /// The org still shows the cause: replay is blocked (unless overridden).
    StillThere,
    /// The check passes now: replay should succeed.
    Gone,
    /// The cause can be checked, but the org could not be asked now.
    NotChecked,
    /// Nothing in the org tells whether the cause is gone (said on the page, never "ok").
    CannotCheck,
}

/// A group's cause, re-checked against the org as it is now.
#[derive(Debug, Clone, Serialize)]
pub struct Cause {
    /// Where it stands.
    pub state: CauseState,
    /// What the org still refuses, each with its fix (for fields and objects the text
    /// `portals-crm mapping validate` and the mapping page give; for sharing and sign-in the
    /// text `portals-crm doctor` gives).
    pub problems: Vec<ProblemView>,
    /// In words.
    pub detail: String,
}

impl Cause {
    fn new(state: CauseState, detail: impl Into<String>) -> Self {
        Self {
            state,
            problems: Vec::new(),
            detail: detail.into(),
        }
    }
}

/// What the org can be asked about a group's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    /// The mapping check for this field (`Object.Field`, `Field`, or a list).
    Field(String),
    /// The mapping check for the objects the failing records write.
    Objects,
    /// Whether the user sees the record now.
    Sharing,
    /// The sign-in, tried now.
    SignIn,
    /// The tenant's circuit.
    Circuit,
    /// Whether the tenant is configured.
    Tenant,
    /// Nothing to ask: why, in words.
    Cannot(&'static str),
}

const PASSING: &str = "a passing condition (the org or this worker was unavailable, or the retries ran out on one): nothing in the org to re-check; the health page shows how the org answers now";
const BROKER: &str =
    "dead-lettered by the broker, not by a Salesforce answer: nothing in the org to re-check";

/// The check for a group of `label` naming `field`; see the module table. A field decides,
/// except for sharing (whose error may list the upsert's key field) and sign-in.
fn check_for(label: &str, field: Option<&str>) -> Check {
    let Some(reason) = Reason::parse(label) else {
        return Check::Cannot("not a reason portals-crm writes: see the message");
    };
    let by_reason = match reason {
        Reason::SharingRecordNotVisible
        | Reason::SharingRecordReadOnly
        | Reason::SharingReferenceNotVisible => Check::Sharing,
        Reason::SignInRefused(_) => Check::SignIn,
        Reason::ApiVersionNotOffered => Check::Cannot(
            "the tenant file's org.api_version is not a version its org offers (doctor lists them): fix the file and reload; these bookings wait without spending attempts",
        ),
        Reason::Salesforce(SalesforceCode::Known(code)) if OBJECT_CODES.contains(&code) => {
            Check::Objects
        }
        Reason::Salesforce(SalesforceCode::Known(_)) => Check::Cannot(
            "this Salesforce error depends on the booking's data or the org's automation (validation rules, triggers, duplicates), which cannot be asked without writing: see the message and its fix",
        ),
        Reason::Salesforce(SalesforceCode::Other) => Check::Cannot(
            "Salesforce answered an error code portals-crm does not classify, which cannot be asked without writing: see the message",
        ),
        Reason::CircuitOpen => Check::Circuit,
        Reason::UnknownTenant => Check::Tenant,
        Reason::MappingError => Check::Cannot(
            "a mapping error is about the event and the mapping, not the org: preview this dead letter in the mapping editor (it is offered there as the event), fix the mapping, then replay",
        ),
        Reason::InvalidEvent => Check::Cannot(
            "the event itself is invalid, which no change in the org fixes: correct the publisher, then purge",
        ),
        Reason::SalesforceUnavailable
        | Reason::RetriesExhausted
        | Reason::ShuttingDown
        | Reason::TenantBusy => Check::Cannot(PASSING),
        Reason::DeliveryLimit
        | Reason::BrokerRejected
        | Reason::BrokerExpired
        | Reason::BrokerMaxlen
        | Reason::BrokerOther
        | Reason::Unrecognised => Check::Cannot(BROKER),
    };
    match (by_reason, field) {
        (check @ (Check::Sharing | Check::SignIn), _) => check,
        (_, Some(field)) => Check::Field(field.to_owned()),
        (check, None) => check,
    }
}

/// Whether `problem` is about `field` (`Object.Field`, `Field`, or a comma-separated list).
fn concerns(problem: &MappingProblem, field: &str) -> bool {
    field
        .split(',')
        .map(str::trim)
        .any(|f| match f.split_once('.') {
            Some(_) => problem.target.eq_ignore_ascii_case(f),
            None => problem
                .field()
                .is_some_and(|name| name.eq_ignore_ascii_case(f)),
        })
}

/// The sObject of the record a dead letter's message names first (`lead_0: …`, `event: …`),
/// per the tenant's mapping.
fn object_of(tenant: &Tenant, message: &str) -> Option<String> {
    let head = message.split(": ").next()?;
    tenant
        .config
        .records
        .iter()
        .find(|r| {
            head == r.reference
                || head
                    .strip_prefix(r.reference.as_str())
                    .and_then(|rest| rest.strip_prefix('_'))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|r| r.sobject.clone())
}

/// What one listing asked of each org, so groups of the same tenant ask once.
#[derive(Default)]
pub(crate) struct Asked {
    mapping: HashMap<String, Result<Vec<MappingProblem>, String>>,
    sign_in: HashMap<String, Cause>,
}

impl Asked {
    async fn mapping(
        &mut self,
        state: &AdminState,
        tenant: &Tenant,
    ) -> &Result<Vec<MappingProblem>, String> {
        let name = tenant.config.tenant.clone();
        if !self.mapping.contains_key(&name) {
            let found = check_against_org(state.tenants.caches(), &tenant.config, &tenant.client)
                .await
                .map_err(|e| format!("the org could not be asked: {e}"));
            self.mapping.insert(name.clone(), found);
        }
        &self.mapping[&name]
    }

    async fn sign_in(&mut self, tenant: &Tenant) -> Cause {
        let name = tenant.config.tenant.clone();
        if let Some(cause) = self.sign_in.get(&name) {
            return cause.clone();
        }
        // A request, not the token cache: a cached token outlives a refusal (the cache keeps
        // it until a refresh succeeds), while a request whose session is gone signs in again.
        let cause = match tenant.client.describe_global().await {
            Ok(_) => Cause::new(
                CauseState::Gone,
                "Salesforce signs the integration user in now: replay should succeed",
            ),
            Err(error) => match error.sign_in_refused() {
                Some(refused) => Cause {
                    state: CauseState::StillThere,
                    problems: vec![ProblemView {
                        record: String::new(),
                        field: None,
                        target: "sign-in".into(),
                        problem: format!(
                            "Salesforce still refuses the sign-in: \"{}\" ({})",
                            refused.description,
                            refused.reason_code()
                        ),
                        fix: refused.fix().to_owned(),
                    }],
                    detail: "the sign-in was tried now and refused".into(),
                },
                None => Cause::new(
                    CauseState::NotChecked,
                    format!("the sign-in could not be tried: {error}"),
                ),
            },
        };
        self.sign_in.insert(name, cause.clone());
        cause
    }
}

/// The cause of the group `tenant` × `reason` × `field` of `letters`, re-checked now.
pub(crate) async fn recheck(
    state: &AdminState,
    asked: &mut Asked,
    tenant: &str,
    reason: &str,
    field: Option<&str>,
    letters: &[&DeadLetter],
) -> Cause {
    let check = check_for(reason, field);
    if let Check::Cannot(why) = check {
        return cannot(why);
    }
    let Some(t) = state.tenants.get(tenant) else {
        return match check {
            Check::Tenant => Cause {
                state: CauseState::StillThere,
                problems: vec![ProblemView {
                    record: String::new(),
                    field: None,
                    target: tenant.to_owned(),
                    problem: format!("no tenant {tenant} is configured"),
                    fix: format!(
                        "add the tenant file {tenant}.toml to the tenants directory and reload"
                    ),
                }],
                detail: format!("tenant {tenant} is still not configured"),
            },
            _ => Cause::new(
                CauseState::NotChecked,
                format!("no tenant {tenant} is configured"),
            ),
        };
    };
    match check {
        Check::Cannot(why) => cannot(why),
        Check::Tenant => Cause::new(
            CauseState::Gone,
            format!("tenant {tenant} is configured now: replay should find it"),
        ),
        Check::Circuit => {
            let status = t.breaker.status();
            if status.state == "closed" {
                Cause::new(
                    CauseState::Gone,
                    "the tenant's circuit is closed now: its org answers",
                )
            } else {
                Cause::new(
                    CauseState::StillThere,
                    format!(
                        "the tenant's circuit is {} now (its org failed, its API quota share is used up, or it refuses the sign-in): a replay would wait again; the health page shows the next probe",
                        status.state.replace('_', "-")
                    ),
                )
            }
        }
        Check::SignIn => asked.sign_in(&t).await,
        Check::Field(field) => match asked.mapping(state, &t).await {
            Ok(problems) => {
                let found: Vec<ProblemView> = problems
                    .iter()
                    .filter(|p| concerns(p, &field))
                    .map(ProblemView::from)
                    .collect();
                field_cause(&field, found)
            }
            Err(e) => Cause::new(CauseState::NotChecked, e.clone()),
        },
        Check::Objects => {
            let objects: Option<BTreeSet<String>> =
                letters.iter().map(|l| object_of(&t, &l.message)).collect();
            match asked.mapping(state, &t).await {
                Ok(problems) => {
                    let found: Vec<ProblemView> = problems
                        .iter()
                        .filter(|p| !p.target.contains('.'))
                        .filter(|p| objects.as_ref().is_none_or(|o| o.contains(&p.target)))
                        .map(ProblemView::from)
                        .collect();
                    let named = objects
                        .map(|o| o.into_iter().collect::<Vec<_>>().join(", "))
                        .unwrap_or_else(|| "every mapped object".into());
                    judged(
                        found,
                        format!(
                            "the integration user may now read, create and edit {named}: replay should succeed"
                        ),
                        format!("the integration user still lacks access to {named}"),
                    )
                }
                Err(e) => Cause::new(CauseState::NotChecked, e.clone()),
            }
        }
        Check::Sharing => sharing_cause(&t, letters).await,
    }
}

/// A cause the org cannot tell about; `why` is shown after "Cannot be re-checked:".
fn cannot(why: &str) -> Cause {
    Cause::new(CauseState::CannotCheck, why)
}

/// Gone when the check found nothing (`gone` says so), else still there with what it found.
fn judged(found: Vec<ProblemView>, gone: String, still: String) -> Cause {
    let (state, detail) = if found.is_empty() {
        (CauseState::Gone, gone)
    } else {
        (CauseState::StillThere, still)
    };
    Cause {
        state,
        problems: found,
        detail,
    }
}

fn field_cause(field: &str, found: Vec<ProblemView>) -> Cause {
    judged(
        found,
        format!(
            "{field} now passes the mapping check as the integration user: replay should succeed"
        ),
        format!("{field} still fails as the integration user"),
    )
}

/// A sharing problem with its fix, as the page lists it.
fn sharing_view(problem: &SharingProblem) -> ProblemView {
    ProblemView {
        record: String::new(),
        field: None,
        target: sharing::TIER.into(),
        problem: problem.condition(),
        fix: problem.fix(),
    }
}

/// Asks the org, for each distinct record the group's messages name, whether the integration
/// user sees it now.
async fn sharing_cause(tenant: &Tenant, letters: &[&DeadLetter]) -> Cause {
    let mut problems: Vec<SharingProblem> = Vec::new();
    for letter in letters {
        match SharingProblem::from_message(&letter.message) {
            Some(p) if !problems.contains(&p) => problems.push(p),
            Some(_) => {}
            None => {
                return cannot(&format!(
                    "the message of {} names no record to ask the org about",
                    letter.id
                ));
            }
        }
    }
    let mut still = Vec::new();
    for problem in &problems {
        match sharing::recheck(&tenant.client, problem).await {
            Ok(sharing::Recheck::Gone) => {}
            Ok(sharing::Recheck::StillThere) => still.push(sharing_view(problem)),
            Ok(sharing::Recheck::CannotCheck(why)) => {
                return Cause {
                    state: CauseState::CannotCheck,
                    problems: vec![sharing_view(problem)],
                    detail: why,
                };
            }
            Err(e) => {
                return Cause::new(
                    CauseState::NotChecked,
                    format!("the org could not be asked: {e}"),
                );
            }
        }
    }
    let still_detail = format!(
        "{} of {} record(s) still not shared with the integration user",
        still.len(),
        problems.len()
    );
    judged(
        still,
        "the integration user sees the record(s) now: replay should succeed".into(),
        still_detail,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(target: &str) -> MappingProblem {
        MappingProblem {
            tenant: "acme".into(),
            record: "lead".into(),
            target: target.into(),
            problem: "not createable".into(),
            fix: "grant Edit".into(),
        }
    }

    #[test]
    fn a_problem_concerns_its_field_with_or_without_the_object() {
        let p = problem("Lead.Phone");
        assert!(concerns(&p, "Lead.Phone"));
        assert!(concerns(&p, "Title,Phone"));
        assert!(!concerns(&p, "Contact.Phone"));
        assert!(!concerns(&p, "Title"));
    }

    #[test]
    fn the_cause_is_still_there_while_the_check_finds_the_field_and_gone_after() {
        let still = field_cause(
            "Lead.Phone",
            vec![ProblemView::from(&problem("Lead.Phone"))],
        );
        assert_eq!(still.state, CauseState::StillThere);
        assert_eq!(still.problems[0].fix, "grant Edit");
        assert_eq!(
            field_cause("Lead.Phone", Vec::new()).state,
            CauseState::Gone
        );
    }

    #[test]
    fn each_reason_has_its_check_and_the_rest_say_they_cannot_be_checked() {
        assert_eq!(
            check_for("salesforce_invalid_field", Some("Lead.Phone")),
            Check::Field("Lead.Phone".into())
        );
        assert_eq!(
            check_for("salesforce_insufficient_access_or_readonly", None),
            Check::Objects
        );
        assert_eq!(check_for("salesforce_invalid_type", None), Check::Objects);
        // A sharing error may list the key field; the record is what to re-check.
        assert_eq!(
            check_for(
                "salesforce_sharing_record_not_visible",
                Some("BookMe__Booking_Id__c")
            ),
            Check::Sharing
        );
        assert_eq!(
            check_for("salesforce_auth_inactive_user", None),
            Check::SignIn
        );
        assert_eq!(check_for("circuit_open", None), Check::Circuit);
        assert_eq!(check_for("unknown_tenant", None), Check::Tenant);
        for label in [
            "invalid_event",
            "mapping_error",
            "salesforce_unavailable",
            "retries_exhausted",
            "broker_expired",
            "salesforce_field_custom_validation_exception",
            "salesforce_other",
            "not_a_reason",
        ] {
            assert!(
                matches!(check_for(label, None), Check::Cannot(_)),
                "{label}"
            );
        }
    }
}
