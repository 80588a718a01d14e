//! Dead letters for the Operations console and its JSON twins: grouped by tenant × reason ×
//! Salesforce field with the fix, searched, shown in full (masked), replayed after their cause
//! was re-checked against the org as it is now, purged with a typed confirmation, exported.
//!
//! Everything reads the dead-letter queue through [`crate::dlq::Dlq`], which fetches
//! unacknowledged and hands every message back when its channel closes: looking never consumes
//! (unlike RabbitMQ's own "Get messages", which the management UI calls destructive). A replay
//! removes a dead letter only after the broker confirmed its copy on the work queue.

use std::collections::{BTreeMap, HashMap};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AdminState, ProblemView};
use crate::amqp::Topology;
use crate::dlq::{DeadLetter, Dlq, DlqError, Filter};
use crate::plan::validate::MappingProblem;
use crate::telemetry::logging::redact;
use crate::tenants::check_against_org;

/// Where the dead-letter queue is: the service's broker URL and topology. A connection is opened
/// per request ([`Dlq::open`]) and closed after it, so a console left open holds nothing.
#[derive(Clone)]
pub struct DlqSource {
    /// `amqp.url` (a secret: it may carry credentials).
    pub url: SecretString,
    /// The queues, as the service declares them.
    pub topology: Topology,
}

impl DlqSource {
    pub(crate) async fn open(&self) -> Result<Dlq, DlqError> {
        Dlq::open(&self.url, self.topology.clone()).await
    }
}

/// Which dead letters a page or route shows: `tenant` and `reason` exactly, `since`/`until`
/// against the last failure (UTC, ISO 8601, compared as text so a prefix such as `2026-11-30T07`
/// works), `q` a booking id or event id (exact), `ids` a comma-separated selection.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Query {
    /// Only this tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Only this reason code.
    #[serde(default)]
    pub reason: Option<String>,
    /// Last failure at or after this.
    #[serde(default)]
    pub since: Option<String>,
    /// Last failure before this.
    #[serde(default)]
    pub until: Option<String>,
    /// A booking id or an event id.
    #[serde(default)]
    pub q: Option<String>,
    /// Comma-separated dead-letter ids.
    #[serde(default)]
    pub ids: Option<String>,
}

fn some(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl Query {
    fn filter(&self) -> Filter {
        Filter {
            tenant: some(&self.tenant).map(str::to_owned),
            reason: some(&self.reason).map(str::to_owned),
            ids: self.id_list(),
            limit: None,
        }
    }

    fn id_list(&self) -> Vec<String> {
        some(&self.ids)
            .map(|ids| {
                ids.split(',')
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The query as a URL query string (`tenant=acme&reason=…`), for the JSON twin.
    pub fn to_query_string(&self) -> String {
        let mut out = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("tenant", &self.tenant),
            ("reason", &self.reason),
            ("since", &self.since),
            ("until", &self.until),
            ("q", &self.q),
            ("ids", &self.ids),
        ] {
            if let Some(value) = some(value) {
                out.append_pair(name, value);
            }
        }
        out.finish()
    }

    fn matches(&self, letter: &DeadLetter) -> bool {
        let failed = letter.last_failure.as_deref().unwrap_or_default();
        some(&self.since).is_none_or(|since| failed >= since)
            && some(&self.until).is_none_or(|until| failed < until)
            && some(&self.q)
                .is_none_or(|q| letter.id == q || letter.booking_id.as_deref() == Some(q))
    }
}

/// The Salesforce field a dead letter names: `Object.Field` when the object is known, else the
/// field. Salesforce lists the fields of most errors in `fields`; `INVALID_FIELD` lists none and
/// names the field in its message, "No such column 'Phone' on sobject of type Lead"
/// (<https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm>).
pub fn field_of(letter: &DeadLetter) -> Option<String> {
    if let Some(fields) = letter
        .salesforce_fields
        .as_deref()
        .filter(|f| !f.is_empty())
    {
        return Some(fields.to_owned());
    }
    let (_, rest) = letter.message.split_once("No such column '")?;
    let (field, rest) = rest.split_once('\'')?;
    let sobject = rest
        .strip_prefix(" on sobject of type ")
        .and_then(|s| s.split(|c: char| !c.is_alphanumeric() && c != '_').next())
        .filter(|s| !s.is_empty());
    Some(match sobject {
        Some(sobject) => format!("{sobject}.{field}"),
        None => field.to_owned(),
    })
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

/// A dead letter in a list: no body.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Dead-letter id (event id).
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Reason code.
    pub reason: String,
    /// The Salesforce field it names, if any.
    pub field: Option<String>,
    /// Booking id.
    pub booking_id: Option<String>,
    /// The booking version the event carries.
    pub version: Option<u64>,
    /// The newer version already written (ledger), when one is: replaying changes nothing.
    pub superseded_by: Option<u64>,
    /// Attempts made.
    pub attempts: i64,
    /// Last failure, RFC 3339.
    pub last_failure: Option<String>,
    /// The failure, emails and phone numbers masked.
    pub message: String,
}

/// Dead letters of one tenant × reason × field, with the cause as the org shows it now.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// Tenant.
    pub tenant: String,
    /// Reason code.
    pub reason: String,
    /// The Salesforce field, if the reason names one.
    pub field: Option<String>,
    /// How many.
    pub count: usize,
    /// Their ids.
    pub ids: Vec<String>,
    /// How many of them a newer version already superseded: replaying those changes nothing.
    pub superseded: usize,
    /// The cause re-checked against the org now.
    pub cause: Cause,
}

/// A group's cause, re-checked against the org as it is now.
#[derive(Debug, Clone, Serialize)]
pub struct Cause {
    /// `still_there` (replay is blocked), `gone` (the check passes now) or `not_checked` (no
    /// check for this reason, or the org could not be asked).
    pub state: &'static str,
    /// The problems the mapping check finds for the field now, each with its fix (the same text
    /// `portals-crm mapping validate` and the mapping page give).
    pub problems: Vec<ProblemView>,
    /// In words.
    pub detail: String,
}

/// The event's booking id and version, if the body is an event.
fn booking_version(letter: &DeadLetter) -> Option<u64> {
    let value: Value = serde_json::from_str(&letter.body).ok()?;
    value["data"]["version"].as_u64()
}

/// The version already written for the letter's booking when it is at least the letter's
/// (the ledger of [`crate::enrich::Caches`]): such a replay is a no-op by the version guard.
fn superseded_by(state: &AdminState, letter: &DeadLetter, version: Option<u64>) -> Option<u64> {
    let version = version?;
    let booking = letter.booking_id.as_deref()?;
    let entry = state.tenants.caches().ledger_get(&letter.tenant, booking)?;
    (entry.version >= version).then_some(entry.version)
}

fn summary(state: &AdminState, letter: &DeadLetter) -> Summary {
    let version = booking_version(letter);
    Summary {
        id: letter.id.clone(),
        tenant: letter.tenant.clone(),
        reason: letter.reason.clone(),
        field: field_of(letter),
        booking_id: letter.booking_id.clone(),
        version,
        superseded_by: superseded_by(state, letter, version),
        attempts: letter.attempts,
        last_failure: letter.last_failure.clone(),
        message: redact(&letter.message),
    }
}

/// The mapping problems of each tenant named, against its org now; `Err` for a tenant whose org
/// could not be asked (or that is not configured).
async fn org_problems(
    state: &AdminState,
    tenants: impl Iterator<Item = String>,
) -> HashMap<String, Result<Vec<MappingProblem>, String>> {
    let mut out = HashMap::new();
    for tenant in tenants {
        if out.contains_key(&tenant) {
            continue;
        }
        let found = match state.tenants.get(&tenant) {
            Some(t) => check_against_org(state.tenants.caches(), &t.config, &t.client)
                .await
                .map_err(|e| format!("the org could not be asked: {e}")),
            None => Err(format!("no tenant {tenant} is configured")),
        };
        out.insert(tenant, found);
    }
    out
}

fn cause_of(field: Option<&str>, problems: Option<&Result<Vec<MappingProblem>, String>>) -> Cause {
    let Some(field) = field else {
        return Cause {
            state: "not_checked",
            problems: Vec::new(),
            detail: "this reason names no Salesforce field, so there is nothing to re-check in the org; see the message".into(),
        };
    };
    match problems {
        Some(Ok(problems)) => {
            let found: Vec<ProblemView> = problems
                .iter()
                .filter(|p| concerns(p, field))
                .map(ProblemView::from)
                .collect();
            if found.is_empty() {
                Cause {
                    state: "gone",
                    problems: found,
                    detail: format!(
                        "{field} now passes the mapping check as the integration user: replay should succeed"
                    ),
                }
            } else {
                Cause {
                    state: "still_there",
                    problems: found,
                    detail: format!("{field} still fails as the integration user"),
                }
            }
        }
        Some(Err(e)) => Cause {
            state: "not_checked",
            problems: Vec::new(),
            detail: e.clone(),
        },
        None => Cause {
            state: "not_checked",
            problems: Vec::new(),
            detail: "not checked".into(),
        },
    }
}

/// What the list shows: the groups (with their causes) and the dead letters.
#[derive(Debug, Serialize)]
pub struct Listing {
    /// Grouped by tenant × reason × field, largest first.
    pub groups: Vec<Group>,
    /// Every matching dead letter, without bodies.
    pub letters: Vec<Summary>,
}

/// Every dead letter matching `query`, read without consuming.
pub(crate) async fn matching(
    source: &DlqSource,
    query: &Query,
) -> Result<Vec<DeadLetter>, DlqError> {
    let dlq = source.open().await?;
    let listed = dlq.list(&query.filter()).await;
    dlq.close().await;
    Ok(listed?.into_iter().filter(|l| query.matches(l)).collect())
}

/// The listing of `letters`, each group's cause re-checked against its org.
pub(crate) async fn listing(state: &AdminState, letters: &[DeadLetter]) -> Listing {
    let summaries: Vec<Summary> = letters.iter().map(|l| summary(state, l)).collect();
    let mut grouped: BTreeMap<(String, String, Option<String>), Vec<String>> = BTreeMap::new();
    for s in &summaries {
        grouped
            .entry((s.tenant.clone(), s.reason.clone(), s.field.clone()))
            .or_default()
            .push(s.id.clone());
    }
    let checked = org_problems(
        state,
        grouped
            .keys()
            .filter(|(_, _, field)| field.is_some())
            .map(|(tenant, _, _)| tenant.clone()),
    )
    .await;
    let mut groups: Vec<Group> = grouped
        .into_iter()
        .map(|((tenant, reason, field), ids)| Group {
            cause: cause_of(field.as_deref(), checked.get(&tenant)),
            superseded: summaries
                .iter()
                .filter(|s| s.superseded_by.is_some() && ids.contains(&s.id))
                .count(),
            tenant,
            reason,
            field,
            count: ids.len(),
            ids,
        })
        .collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.count));
    Listing {
        groups,
        letters: summaries,
    }
}

/// Masks every email address and phone number in the string values of `value`.
fn mask(value: &mut Value) {
    match value {
        Value::String(s) => *s = redact(s),
        Value::Array(items) => items.iter_mut().for_each(mask),
        Value::Object(fields) => fields.values_mut().for_each(mask),
        _ => {}
    }
}

/// The body for people: pretty JSON (masked unless `reveal`), or the text as it is (masked
/// unless `reveal`) when it is not JSON.
pub fn body_for_people(body: &str, reveal: bool) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(mut value) => {
            if !reveal {
                mask(&mut value);
            }
            serde_json::to_string_pretty(&value).unwrap_or_else(|_| body.to_owned())
        }
        Err(_) if reveal => body.to_owned(),
        Err(_) => redact(body),
    }
}

/// One dead letter in full.
#[derive(Debug, Serialize)]
pub struct Detail {
    /// As in the list.
    pub summary: Summary,
    /// The `x-portals-*` headers and the broker's cause, as read.
    pub headers: BTreeMap<&'static str, String>,
    /// Salesforce's `errorCode`.
    pub salesforce_error: Option<String>,
    /// The body, pretty-printed; emails and phones masked unless asked for.
    pub body: String,
    /// Whether the body is shown unmasked.
    pub revealed: bool,
    /// Its group's cause, re-checked now.
    pub cause: Cause,
}

/// One dead letter by id, in full.
pub(crate) async fn detail(
    state: &AdminState,
    source: &DlqSource,
    id: &str,
    reveal: bool,
) -> Result<Detail, DlqError> {
    let query = Query {
        ids: Some(id.to_owned()),
        ..Query::default()
    };
    let letter = matching(source, &query)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| DlqError::NotFound(id.to_owned()))?;
    let summary = summary(state, &letter);
    let checked = org_problems(state, summary.field.iter().map(|_| summary.tenant.clone())).await;
    let cause = cause_of(summary.field.as_deref(), checked.get(&summary.tenant));
    let mut headers = BTreeMap::new();
    for (name, value) in [
        ("x-portals-reason", Some(letter.reason.clone())),
        ("x-portals-message", Some(redact(&letter.message))),
        ("x-portals-tenant", Some(letter.tenant.clone())),
        ("x-portals-event-id", Some(letter.id.clone())),
        ("x-portals-booking-id", letter.booking_id.clone()),
        ("x-portals-attempt", Some(letter.attempts.to_string())),
        ("x-portals-sf-error-code", letter.salesforce_error.clone()),
        ("x-portals-sf-fields", letter.salesforce_fields.clone()),
        ("x-portals-first-failure", letter.first_failure.clone()),
        ("x-portals-last-failure", letter.last_failure.clone()),
        ("x-portals-routing-key", letter.routing_key.clone()),
    ] {
        if let Some(value) = value {
            headers.insert(name, value);
        }
    }
    Ok(Detail {
        summary,
        headers,
        salesforce_error: letter.salesforce_error.clone(),
        body: body_for_people(&letter.body, reveal),
        revealed: reveal,
        cause,
    })
}

/// A replay request: the selection, and whether to replay despite a cause still there.
#[derive(Debug, Deserialize)]
pub struct ReplayRequest {
    /// The dead letters to replay (a group's ids, a selection, or one).
    pub ids: Vec<String>,
    /// Replay even the dead letters whose cause the org still shows.
    #[serde(default, rename = "override")]
    pub override_cause: bool,
}

/// What a replay did.
#[derive(Debug, Serialize)]
pub struct ReplayAnswer {
    /// Replayed: published to the work queue, confirmed, and removed from the DLQ.
    pub replayed: Vec<String>,
    /// Of those, already superseded by a newer version (the version guard makes them no-ops).
    pub superseded: Vec<String>,
    /// Kept, because their cause is still there (and no override): each with why and the fix.
    pub blocked: Vec<Blocked>,
    /// Asked for but not in the queue (any more).
    pub missing: Vec<String>,
}

/// A dead letter kept because its cause is still there.
#[derive(Debug, Serialize)]
pub struct Blocked {
    /// Dead-letter id.
    pub id: String,
    /// Why, in words.
    pub detail: String,
    /// The problems, each with its fix.
    pub problems: Vec<ProblemView>,
}

/// Re-checks the cause of each chosen dead letter and replays those whose cause is gone (or all
/// with the override); each is removed only after the broker confirmed its copy.
pub(crate) async fn replay(
    state: &AdminState,
    source: &DlqSource,
    request: &ReplayRequest,
) -> Result<ReplayAnswer, DlqError> {
    let query = Query {
        ids: Some(request.ids.join(",")),
        ..Query::default()
    };
    let letters = if request.ids.is_empty() {
        Vec::new()
    } else {
        matching(source, &query).await?
    };
    let listing = listing(state, &letters).await;
    let mut blocked = Vec::new();
    let mut go = Vec::new();
    for group in &listing.groups {
        if group.cause.state == "still_there" && !request.override_cause {
            blocked.extend(group.ids.iter().map(|id| Blocked {
                id: id.clone(),
                detail: group.cause.detail.clone(),
                problems: group.cause.problems.clone(),
            }));
        } else {
            go.extend(group.ids.iter().cloned());
        }
    }
    let missing = request
        .ids
        .iter()
        .filter(|id| !letters.iter().any(|l| &l.id == *id))
        .cloned()
        .collect();
    let superseded = listing
        .letters
        .iter()
        .filter(|l| l.superseded_by.is_some() && go.contains(&l.id))
        .map(|l| l.id.clone())
        .collect();
    let replayed = if go.is_empty() {
        Vec::new()
    } else {
        let dlq = source.open().await?;
        let filter = Filter {
            ids: go,
            ..Filter::default()
        };
        let result = dlq.replay(&filter, false).await;
        dlq.close().await;
        result?.into_iter().map(|l| l.id).collect()
    };
    Ok(ReplayAnswer {
        replayed,
        superseded,
        blocked,
        missing,
    })
}

/// A purge request: the selection and the typed confirmation, `purge <n>` for `n` ids.
#[derive(Debug, Deserialize)]
pub struct PurgeRequest {
    /// The dead letters to remove.
    pub ids: Vec<String>,
    /// Must be `purge <n>`, `n` the number of ids.
    #[serde(default)]
    pub confirm: String,
}

impl PurgeRequest {
    /// The confirmation this purge needs.
    pub fn expected(&self) -> String {
        format!("purge {}", self.ids.len())
    }
}

/// Removes the chosen dead letters for good.
pub(crate) async fn purge(source: &DlqSource, ids: Vec<String>) -> Result<Vec<String>, DlqError> {
    let dlq = source.open().await?;
    let result = dlq
        .purge(&Filter {
            ids,
            ..Filter::default()
        })
        .await;
    dlq.close().await;
    Ok(result?.into_iter().map(|l| l.id).collect())
}

/// The CLI twin of a listing or action on `query`.
pub fn cli_twin(verb: &str, query: &Query) -> String {
    let mut out = format!("portals-crm dlq {verb}");
    if let Some(tenant) = some(&query.tenant) {
        out.push_str(&format!(" --tenant {tenant}"));
    }
    if let Some(reason) = some(&query.reason) {
        out.push_str(&format!(" --reason {reason}"));
    }
    for id in query.id_list() {
        out.push_str(&format!(" --id {id}"));
    }
    if let Some(q) = some(&query.q) {
        out.push_str(&format!(
            " --json | jq '.[] | select(.id == \"{q}\" or .booking_id == \"{q}\")'"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(message: &str, fields: Option<&str>) -> DeadLetter {
        DeadLetter {
            id: "evt_1".into(),
            tenant: "acme".into(),
            reason: "salesforce_invalid_field".into(),
            message: message.into(),
            salesforce_error: Some("INVALID_FIELD".into()),
            salesforce_fields: fields.map(str::to_owned),
            booking_id: Some("bk_1".into()),
            attempts: 1,
            first_failure: None,
            last_failure: Some("2026-11-30T07:00:00.000Z".into()),
            routing_key: None,
            body: String::new(),
        }
    }

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
    fn the_field_comes_from_the_fields_list_else_from_invalid_fields_message() {
        assert_eq!(
            field_of(&letter(
                "lead_0: No such column 'Phone' on sobject of type Lead",
                None
            ))
            .as_deref(),
            Some("Lead.Phone")
        );
        assert_eq!(
            field_of(&letter(
                "Unable to create/update fields: Phone",
                Some("Phone")
            ))
            .as_deref(),
            Some("Phone")
        );
        assert_eq!(field_of(&letter("503", None)), None);
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
        let still = cause_of(Some("Lead.Phone"), Some(&Ok(vec![problem("Lead.Phone")])));
        assert_eq!(still.state, "still_there");
        assert_eq!(still.problems[0].fix, "grant Edit");
        let gone = cause_of(Some("Lead.Phone"), Some(&Ok(vec![problem("Lead.Title")])));
        assert_eq!(gone.state, "gone");
        let unasked = cause_of(Some("Lead.Phone"), Some(&Err("down".into())));
        assert_eq!(unasked.state, "not_checked");
        assert_eq!(cause_of(None, None).state, "not_checked");
    }

    #[test]
    fn bodies_are_pretty_and_masked_unless_revealed() {
        let body = r#"{"data":{"attendees":[{"email":"jane.doe@globex.example","phone":"+47 555 01234","title":"<b>CTO</b>"}]}}"#;
        let shown = body_for_people(body, false);
        assert!(shown.contains("j***@globex.example"), "{shown}");
        assert!(shown.contains("[phone]"), "{shown}");
        assert!(!shown.contains("jane.doe"), "{shown}");
        assert!(
            shown.contains("<b>CTO</b>"),
            "markup is kept as text here; the page escapes it"
        );
        assert!(shown.contains('\n'), "pretty-printed");
        let revealed = body_for_people(body, true);
        assert!(revealed.contains("jane.doe@globex.example"));
        assert_eq!(body_for_people("call 5550123456", false), "call [phone]");
    }

    #[test]
    fn time_and_id_filters() {
        let l = letter("x", None);
        let q = |since: &str, until: &str, id: &str| Query {
            since: Some(since.into()),
            until: Some(until.into()),
            q: Some(id.into()),
            ..Query::default()
        };
        assert!(q("2026-11-30T06", "2026-11-30T08", "bk_1").matches(&l));
        assert!(q("", "", "evt_1").matches(&l));
        assert!(!q("2026-11-30T07:01", "", "").matches(&l));
        assert!(!q("", "2026-11-30T07:00", "").matches(&l));
        assert!(!q("", "", "bk_2").matches(&l));
    }

    #[test]
    fn purge_needs_its_count_typed() {
        let request = PurgeRequest {
            ids: vec!["a".into(), "b".into()],
            confirm: String::new(),
        };
        assert_eq!(request.expected(), "purge 2");
    }
}
