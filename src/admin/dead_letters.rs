//! Dead letters for the Operations console and its JSON twins: grouped by tenant × reason ×
//! Salesforce field with the fix, searched, shown in full (masked), marked when a newer version
//! superseded them (in this worker's ledger or in the org, [`super::superseded`]), replayed
//! after their cause was re-checked against the org as it is now ([`super::causes`]), purged
//! with a typed confirmation, exported.
//!
//! Everything reads the dead-letter queue through [`crate::dlq::Dlq`], which fetches
//! unacknowledged and hands every message back when its channel closes: looking never consumes
//! (unlike RabbitMQ's own "Get messages", which the management UI calls destructive). A replay
//! removes a dead letter only after the broker confirmed its copy on the work queue.

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::causes::{self, Cause, CauseState};
use super::superseded::{self, VersionTarget};
use super::twin::shell_word;
use super::{AdminState, ProblemView};
use crate::amqp::Topology;
use crate::dlq::{DeadLetter, Dlq, DlqError, Filter};
use crate::telemetry::logging::redact;

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

    /// The dead letters `filter` matches, read without consuming, on a connection of their own.
    async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>, DlqError> {
        let dlq = self.open().await?;
        let listed = dlq.list(filter).await;
        dlq.close().await;
        listed
    }
}

/// Which dead letters a page or route shows: `tenant` and `reason` exactly, `since`/`until`
/// against the last failure (UTC, ISO 8601, compared as text so a prefix such as `2026-11-30T07`
/// works), `q` a booking id or event id (exact), `ids` a comma-separated selection, `id` one id
/// whole (repeated for several: an event id may hold a comma).
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
    /// Dead-letter ids, each whole: the URL's `id=` pairs, read by [`Query::with_id_pairs`]
    /// (serde's form decoding takes no repeated key).
    #[serde(skip)]
    pub id: Vec<String>,
}

fn some(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl Query {
    /// The filters a person typed that cannot match anything: a reason that is no reason code
    /// ([`crate::outcome::Reason::check_label`]), named with the codes it resembles.
    ///
    /// # Errors
    /// `reason: not a reason code …`.
    pub fn check(&self) -> Result<(), String> {
        match some(&self.reason) {
            Some(reason) => crate::outcome::Reason::check_label(reason)
                .map_err(|problem| format!("reason: {problem}")),
            None => Ok(()),
        }
    }

    /// With each `id=` of the URL's query string `raw` in [`Query::id`]. The console's export
    /// of a selection sends its ids so, since a CloudEvents `id` may hold the comma that `ids`
    /// splits at (<https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md#id>).
    pub fn with_id_pairs(mut self, raw: Option<&str>) -> Self {
        self.id = url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
            .filter(|(name, value)| name == "id" && !value.is_empty())
            .map(|(_, value)| value.into_owned())
            .collect();
        self
    }

    fn filter(&self) -> Filter {
        Filter {
            tenant: some(&self.tenant).map(str::to_owned),
            reason: some(&self.reason).map(str::to_owned),
            ids: self.chosen_ids(),
            limit: None,
            // The console reports an id gone meanwhile next to what it did with the others.
            require_ids: false,
        }
    }

    /// The ids chosen: those of `ids`, split at commas, then each of `id`.
    pub fn chosen_ids(&self) -> Vec<String> {
        let mut ids = self.id_list();
        ids.extend(self.id.iter().cloned());
        ids
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
        for id in &self.id {
            out.append_pair("id", id);
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
    /// The newer version already written, when one is: replaying changes nothing.
    pub superseded_by: Option<u64>,
    /// Who knows of it: `org` (the org holds it) or `ledger` (this worker wrote it).
    pub superseded_in: Option<&'static str>,
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
    /// Why the org was not asked for newer versions (the ledger still was), if it was not.
    pub versions_unasked: Option<String>,
    /// The cause re-checked against the org now.
    pub cause: Cause,
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
    let superseded_by = superseded_by(state, letter, version);
    Summary {
        id: letter.id.clone(),
        tenant: letter.tenant.clone(),
        reason: letter.reason.clone(),
        field: field_of(letter),
        booking_id: letter.booking_id.clone(),
        version,
        superseded_by,
        superseded_in: superseded_by.map(|_| "ledger"),
        attempts: letter.attempts,
        last_failure: letter.last_failure.clone(),
        message: redact(&letter.message),
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
    let listed = source.list(&query.filter()).await?;
    Ok(listed.into_iter().filter(|l| query.matches(l)).collect())
}

/// The dead letters whose id is one of `ids`, each compared whole, of `tenant` when given.
/// Not through [`Query::ids`]: that is what a person types in a URL, split at commas, and a
/// CloudEvents `id` is any non-empty string, commas and spaces included
/// (<https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md#id>).
///
/// # Errors
/// [`DlqError`] when the dead-letter queue cannot be read.
pub(crate) async fn with_ids(
    source: &DlqSource,
    tenant: Option<&str>,
    ids: &[String],
) -> Result<Vec<DeadLetter>, DlqError> {
    source
        .list(&Filter {
            tenant: tenant.map(str::to_owned),
            ids: ids.to_vec(),
            ..Filter::default()
        })
        .await
}

/// How many of a tenant's dead letters the mapping editor offers as preview events.
pub const RECENT: usize = 20;

/// A dead letter the mapping editor offers as a preview event: no body, nothing personal.
#[derive(Debug, Clone, Serialize)]
pub struct Recent {
    /// Dead-letter id.
    pub id: String,
    /// Reason code.
    pub reason: String,
    /// Booking id.
    pub booking_id: Option<String>,
    /// Last failure, RFC 3339.
    pub last_failure: Option<String>,
}

/// The [`RECENT`] newest dead letters of `tenant`, newest first, read without consuming.
pub(crate) async fn recent(source: &DlqSource, tenant: &str) -> Result<Vec<Recent>, DlqError> {
    let query = Query {
        tenant: Some(tenant.to_owned()),
        ..Query::default()
    };
    let mut letters = matching(source, &query).await?;
    letters.sort_by(|a, b| b.last_failure.cmp(&a.last_failure));
    Ok(letters
        .into_iter()
        .take(RECENT)
        .map(|l| Recent {
            id: l.id,
            reason: l.reason,
            booking_id: l.booking_id,
            last_failure: l.last_failure,
        })
        .collect())
}

/// Marks the summaries (of one group of `tenant`) whose booking the org already holds at the
/// same or a newer version: one query for the group ([`superseded::org_versions`]). `Err`: why
/// the org was not asked.
async fn mark_superseded_in_org(
    state: &AdminState,
    tenant: &str,
    summaries: &mut [&mut Summary],
) -> Result<(), String> {
    let mut booking_ids: Vec<&str> = summaries
        .iter()
        .filter(|s| s.version.is_some())
        .filter_map(|s| s.booking_id.as_deref())
        .collect();
    booking_ids.sort_unstable();
    booking_ids.dedup();
    if booking_ids.is_empty() {
        return Ok(());
    }
    let t = state
        .tenants
        .get(tenant)
        .ok_or_else(|| format!("no tenant {tenant} is configured"))?;
    let target = VersionTarget::of(&t.config)
        .ok_or("the mapping writes no record keyed by the booking id with its version")?;
    let found = superseded::org_versions(&t.client, &target, &booking_ids)
        .await
        .map_err(|e| format!("the org could not be asked for newer versions: {e}"))?;
    for s in summaries.iter_mut() {
        let (Some(version), Some(booking)) = (s.version, s.booking_id.as_deref()) else {
            continue;
        };
        if let Some(&held) = found.get(booking).filter(|held| **held >= version) {
            s.superseded_by = Some(s.superseded_by.map_or(held, |ledger| ledger.max(held)));
            s.superseded_in = Some("org");
        }
    }
    Ok(())
}

/// The listing of `letters`: each group's superseded dead letters (ledger or org) and its
/// cause re-checked against its org.
pub(crate) async fn listing(state: &AdminState, letters: &[DeadLetter]) -> Listing {
    let mut summaries: Vec<Summary> = letters.iter().map(|l| summary(state, l)).collect();
    let mut grouped: BTreeMap<(String, String, Option<String>), Vec<usize>> = BTreeMap::new();
    for (i, s) in summaries.iter().enumerate() {
        grouped
            .entry((s.tenant.clone(), s.reason.clone(), s.field.clone()))
            .or_default()
            .push(i);
    }
    let mut asked = causes::Asked::default();
    let mut groups = Vec::new();
    for ((tenant, reason, field), members) in grouped {
        let mut mine: Vec<&mut Summary> = summaries
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| members.contains(i))
            .map(|(_, s)| s)
            .collect();
        let versions_unasked = mark_superseded_in_org(state, &tenant, &mut mine)
            .await
            .err();
        let group_letters: Vec<&DeadLetter> = members.iter().map(|&i| &letters[i]).collect();
        let cause = causes::recheck(
            state,
            &mut asked,
            &tenant,
            &reason,
            field.as_deref(),
            &group_letters,
        )
        .await;
        groups.push(Group {
            superseded: members
                .iter()
                .filter(|&&i| summaries[i].superseded_by.is_some())
                .count(),
            ids: members.iter().map(|&i| summaries[i].id.clone()).collect(),
            count: members.len(),
            versions_unasked,
            cause,
            tenant,
            reason,
            field,
        });
    }
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
    /// The cause re-checked now: of the letters with this id, that of a group whose cause is
    /// still there (it holds back a replay by this id), else the shown letter's group's.
    pub cause: Cause,
    /// How many dead letters have this id: more than one when an event was published or
    /// dead-lettered again, or when events reuse an id. The detail is the first's; a replay or
    /// purge by id acts on all of them.
    pub with_id: usize,
    /// The groups of the letters with this id (tenant × reason × field, with their causes).
    pub with_id_groups: Vec<Group>,
}

/// One dead letter by id, in full.
pub(crate) async fn detail(
    state: &AdminState,
    source: &DlqSource,
    id: &str,
    reveal: bool,
) -> Result<Detail, DlqError> {
    let all = with_ids(source, None, &[id.to_owned()]).await?;
    let Some(letter) = all.first() else {
        return Err(DlqError::NotFound(id.to_owned()));
    };
    let mut listing = listing(state, &all).await;
    let summary = listing.letters.swap_remove(0);
    let cause = listing
        .groups
        .iter()
        .find(|g| g.cause.state == CauseState::StillThere)
        .or_else(|| {
            listing.groups.iter().find(|g| {
                g.tenant == summary.tenant && g.reason == summary.reason && g.field == summary.field
            })
        })
        .map(|g| g.cause.clone())
        .unwrap_or_else(|| listing.groups[0].cause.clone());
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
        with_id: all.len(),
        with_id_groups: listing.groups,
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
    /// Of those, whose cause cannot be re-checked against the org (replayed unchecked).
    pub unchecked: Vec<String>,
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
    let letters = if request.ids.is_empty() {
        Vec::new()
    } else {
        with_ids(source, None, &request.ids).await?
    };
    let listing = listing(state, &letters).await;
    let mut blocked = Vec::new();
    let mut go = Vec::new();
    let mut unchecked = Vec::new();
    for group in &listing.groups {
        if group.cause.state == CauseState::CannotCheck {
            unchecked.extend(group.ids.iter().cloned());
        }
        if group.cause.state == CauseState::StillThere && !request.override_cause {
            blocked.extend(group.ids.iter().map(|id| Blocked {
                id: id.clone(),
                detail: group.cause.detail.clone(),
                problems: group.cause.problems.clone(),
            }));
        } else {
            go.extend(group.ids.iter().cloned());
        }
    }
    // A replay selects by id: letters that share an id go together, so one whose cause is still
    // there holds back the others with its id (the page says so), rather than going with them.
    go.retain(|id| !blocked.iter().any(|b| &b.id == id));
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
    unchecked.retain(|id| go.contains(id));
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
        result?.letters.into_iter().map(|l| l.id).collect()
    };
    unchecked.retain(|id| replayed.contains(id));
    Ok(ReplayAnswer {
        replayed,
        superseded,
        unchecked,
        blocked,
        missing,
    })
}

/// A purge request: the selection and the typed confirmation, `purge <n>`: `n` the number of
/// ids, or of the dead letters they select when that is more (letters that share an id go
/// together, also those the page did not show).
#[derive(Debug, Deserialize)]
pub struct PurgeRequest {
    /// The dead letters to remove.
    pub ids: Vec<String>,
    /// Must be [`PurgeRequest::expected`].
    #[serde(default)]
    pub confirm: String,
}

impl PurgeRequest {
    /// The confirmation this purge needs, when its ids select `selected` dead letters now.
    pub fn expected(&self, selected: usize) -> String {
        format!("purge {}", self.ids.len().max(selected))
    }
}

/// Removes the chosen dead letters for good: the ids purged, and those no dead letter had
/// (gone meanwhile: replayed or purged by someone else).
pub(crate) async fn purge(
    source: &DlqSource,
    ids: Vec<String>,
) -> Result<(Vec<String>, Vec<String>), DlqError> {
    let dlq = source.open().await?;
    let result = dlq
        .purge(&Filter {
            ids: ids.clone(),
            ..Filter::default()
        })
        .await;
    dlq.close().await;
    let purged: Vec<String> = result?.letters.into_iter().map(|l| l.id).collect();
    let missing = ids.into_iter().filter(|id| !purged.contains(id)).collect();
    Ok((purged, missing))
}

/// The CLI twin of a listing or action on `query`.
pub fn cli_twin(verb: &str, query: &Query) -> String {
    let mut out = format!("portals-crm dlq {verb}");
    if let Some(tenant) = some(&query.tenant) {
        out.push_str(&format!(" --tenant {}", shell_word(tenant)));
    }
    if let Some(reason) = some(&query.reason) {
        out.push_str(&format!(" --reason {}", shell_word(reason)));
    }
    for id in query.chosen_ids() {
        out.push_str(&format!(" --id {}", shell_word(&id)));
    }
    if let Some(q) = some(&query.q) {
        // `--arg`: jq takes the value as a string, never as part of its program.
        out.push_str(&format!(
            " --json | jq --arg q {} '.[] | select(.id == $q or .booking_id == $q)'",
            shell_word(q)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_pair_is_one_id_whole_and_goes_into_every_twin() {
        let query = Query {
            ids: Some("evt_1,evt_2".into()),
            ..Query::default()
        }
        .with_id_pairs(Some("ids=evt_1%2Cevt_2&id=evt+3%2Cv2&id=&id=evt_4"));
        assert_eq!(query.id, ["evt 3,v2", "evt_4"]);
        assert_eq!(query.filter().ids, ["evt_1", "evt_2", "evt 3,v2", "evt_4"]);
        assert_eq!(
            query.to_query_string(),
            "ids=evt_1%2Cevt_2&id=evt+3%2Cv2&id=evt_4"
        );
        assert_eq!(
            cli_twin("list", &query),
            "portals-crm dlq list --id evt_1 --id evt_2 --id 'evt 3,v2' --id evt_4"
        );
    }

    #[test]
    fn the_cli_twin_quotes_each_value_as_one_shell_word() {
        let query = Query {
            tenant: Some("acme".into()),
            ids: Some("evt_1, it's $(id)".into()),
            q: Some("bk_1\" or true".into()),
            ..Query::default()
        };
        assert_eq!(
            cli_twin("list", &query),
            "portals-crm dlq list --tenant acme --id evt_1 --id \"it's \"'$(id)' \
             --json | jq --arg q 'bk_1\" or true' '.[] | select(.id == $q or .booking_id == $q)'"
        );
    }

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
    fn bodies_are_pretty_and_masked_unless_revealed() {
        let body = r#"{"data":{"starts_at":"2026-12-01T14:00:00Z","attendees":[{"email":"jane.doe@globex.example","phone":"+47 555 01234","title":"<b>CTO</b>"}]}}"#;
        let shown = body_for_people(body, false);
        assert!(
            shown.contains("\"2026-12-01T14:00:00Z\""),
            "a date is not a phone: {shown}"
        );
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
        assert_eq!(request.expected(2), "purge 2");
        // One gone meanwhile: still the selection's count (the answer names it missing).
        assert_eq!(request.expected(1), "purge 2");
        // Three letters share those two ids: all three go, so all three are confirmed.
        assert_eq!(request.expected(3), "purge 3");
    }
}
