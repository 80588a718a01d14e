//! The pipeline of one message: decode → enrich → plan → batch and send → what happened.
//! It holds no broker types: it takes a body and answers a [`Processed`], which the consumer
//! hands to [`crate::outcome`] to decide and settle. That is what lets the tests drive it
//! against the emulator without a broker.

use std::sync::Arc;

use time::OffsetDateTime;

use crate::batch::{BatcherStopped, GraphOutcome};
use crate::config::DuplicateRulePolicy;
use crate::enrich::duplicates::Choice;
use crate::enrich::{LedgerEntry, LedgerRead, enrich};
use crate::event::{self, BookingEvent, InvalidEvent};
use crate::plan::duplicates::Related;
use crate::plan::relations::{Existing, NODE_PREFIX};
use crate::plan::{PlanError, duplicates, invalid_values, sobject_of};
use crate::salesforce::SalesforceError;
use crate::salesforce::circuit::CircuitOpen;
use crate::salesforce::model::{ApiError, GraphResult, Subrequest};
use crate::sharing::SharingProblem;
use crate::telemetry::metrics::Metrics;
use crate::tenants::{Admission, Registry, Tenant, TenantBusy};

/// Times one booking's graph is sent again with refused values repaired
/// ([`invalid_values::repair`]): each round repairs at least one field, and a graph has at most
/// 500 nodes; past this the booking fails with the org's error.
const MAX_REPAIR_ROUNDS: usize = 16;

/// A refused graph, repaired to be sent again.
enum Repaired {
    /// Refused values punycoded or left out.
    Values(Vec<Subrequest>, Vec<invalid_values::Repair>),
    /// A record a duplicate rule matched, replaced by the existing record.
    Related(Vec<Subrequest>, Related),
}

/// Who a message is about, for logs and dead-letter headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageInfo {
    /// Tenant, or `unknown` when the event did not decode or its tenant is not configured
    /// (so metric labels stay bounded).
    pub tenant: String,
    /// The event's `tenantid` as sent, when the event decoded, configured or not: what the
    /// dead-letter headers name, so that an event for a tenant not configured yet is found by
    /// `dlq … --tenant <id>` once it is.
    pub tenant_id: Option<String>,
    /// Booking id, when the event decoded.
    pub booking_id: Option<String>,
    /// CloudEvents id, when the event decoded.
    pub event_id: Option<String>,
}

/// What processing a message came to.
#[derive(Debug)]
pub enum Outcome {
    /// Salesforce committed the booking's graph.
    Written,
    /// The ledger holds this version or a newer one: nothing to write.
    AlreadyApplied,
    /// A newer version of the booking was in the same batch and was sent instead.
    Collapsed,
    /// It was not written; [`crate::outcome::decide`] says what happens next.
    Failed(Failure),
}

/// Every way a message can fail to be written. Each variant's fate is decided in one place,
/// [`crate::outcome::decide`].
#[derive(Debug)]
pub enum Failure {
    /// Not a valid booking event.
    InvalidEvent(InvalidEvent),
    /// The event's tenant is not configured.
    UnknownTenant(String),
    /// The tenant is paused by its circuit breaker.
    CircuitOpen(CircuitOpen),
    /// The tenant's mapping cannot render this event.
    Mapping(PlanError),
    /// A Salesforce request failed as a whole (enrichment look-ups, or the batch request).
    Salesforce(Arc<SalesforceError>),
    /// Record-level security (sharing) refused a node of the graph: `problem` says which and
    /// how to fix it; `cause` is Salesforce's error.
    Sharing {
        /// The condition and its fix.
        problem: SharingProblem,
        /// Salesforce's error.
        cause: Option<ApiError>,
    },
    /// Salesforce rolled the booking's graph back; `cause` is the first node with a real error.
    Rejected {
        /// The error that rolled the graph back, when Salesforce named one.
        cause: Option<ApiError>,
    },
    /// The tenant has its limit of messages in flight in this worker.
    TenantBusy(TenantBusy),
    /// The worker is stopping and its batcher no longer sends.
    ShuttingDown(BatcherStopped),
}

/// The result of processing one message, before it is settled.
#[derive(Debug)]
pub struct Processed {
    /// Who it is about.
    pub info: MessageInfo,
    /// The `type` metric label: the event kind, or `invalid`.
    pub type_label: &'static str,
    /// What happened.
    pub outcome: Outcome,
}

/// Everything a message needs on its way through decode → enrich → plan → batch.
pub struct Pipeline {
    tenants: Arc<Registry>,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
}

/// True when a graph failed only because a record it deletes does not exist (any more).
fn already_deleted(result: &GraphResult, deletes: &[Subrequest]) -> bool {
    !result.is_successful
        && result.graph_response.composite_response.iter().any(|node| {
            deletes.iter().any(|d| d.reference_id == node.reference_id)
                && node.http_status_code == 404
        })
        && result
            .root_error()
            .is_some_and(|e| e.error_code == "NOT_FOUND")
}

impl Pipeline {
    /// A pipeline over the tenants of `tenants`; bodies over `max_body_bytes` are refused unread.
    pub fn new(tenants: Arc<Registry>, metrics: Arc<Metrics>, max_body_bytes: usize) -> Self {
        Self {
            tenants,
            metrics,
            max_body_bytes,
        }
    }

    /// The tenants it writes for.
    pub fn tenants(&self) -> &Arc<Registry> {
        &self.tenants
    }

    fn tenant_label(&self, tenant: Option<&str>) -> String {
        match tenant {
            Some(t) if self.tenants.get(t).is_some() => t.to_owned(),
            _ => "unknown".to_owned(),
        }
    }

    /// Processes one message body from the shared queue (a busy tenant's message is parked);
    /// never fails, never panics: every failure is an [`Outcome`].
    pub async fn process(&self, body: &[u8]) -> Processed {
        self.process_admitted(body, Admission::Park).await
    }

    /// As [`Pipeline::process`], with what the message does when its tenant is at its limit
    /// of messages in flight.
    pub async fn process_admitted(&self, body: &[u8], admission: Admission) -> Processed {
        let event = match event::decode(body, self.max_body_bytes) {
            Ok(event) => event,
            Err(invalid) => {
                let tenant = self.tenant_label(event::peek_tenant(body).as_deref());
                self.metrics
                    .events_received
                    .with_label_values(&[tenant.as_str(), "invalid"])
                    .inc();
                return Processed {
                    info: MessageInfo {
                        tenant,
                        ..MessageInfo::default()
                    },
                    type_label: "invalid",
                    outcome: Outcome::Failed(Failure::InvalidEvent(invalid)),
                };
            }
        };
        let tenant_label = self.tenant_label(Some(&event.tenant));
        self.metrics
            .unknown_fields
            .observe(&tenant_label, &event.id, &event.unknown_fields);
        let type_label = event.kind.as_str();
        self.metrics
            .events_received
            .with_label_values(&[tenant_label.as_str(), type_label])
            .inc();
        let info = MessageInfo {
            tenant: tenant_label,
            tenant_id: Some(event.tenant.clone()),
            booking_id: Some(event.booking.booking_id.clone()),
            event_id: Some(event.id.clone()),
        };
        let outcome = match self.tenants.get(&event.tenant) {
            None => Outcome::Failed(Failure::UnknownTenant(event.tenant.clone())),
            Some(tenant) => self.write(&tenant, &event, admission).await,
        };
        Processed {
            info,
            type_label,
            outcome,
        }
    }

    async fn write(&self, tenant: &Tenant, event: &BookingEvent, admission: Admission) -> Outcome {
        let booking = &event.booking;
        let caches = self.tenants.caches();
        let applied = caches.ledger_read(&event.tenant, &booking.booking_id);
        if applied
            .entry
            .as_ref()
            .is_some_and(|a| a.version >= booking.version)
        {
            return Outcome::AlreadyApplied;
        }
        // What the previous version left the Event's relations as, when the ledger knows.
        let relations_before = applied
            .entry
            .as_ref()
            .filter(|a| a.version + 1 == booking.version)
            .and_then(|a| a.relations.clone());
        if let Err(open) = tenant.breaker.allow() {
            return Outcome::Failed(Failure::CircuitOpen(open));
        }
        // Held until the write is answered: the tenant's share of the work in flight.
        let _slot = match tenant.slot(admission).await {
            Ok(slot) => slot,
            Err(busy) => {
                self.metrics
                    .tenant_busy
                    .with_label_values(&[event.tenant.as_str()])
                    .inc();
                return Outcome::Failed(Failure::TenantBusy(busy));
            }
        };
        let enrichment = match enrich(event, &tenant.client, caches).await {
            Ok(e) => e,
            Err(error) => {
                tenant.observe(Some(&error));
                return Outcome::Failed(Failure::Salesforce(Arc::new(error)));
            }
        };
        let nodes = match tenant.mapping.build_graph(event, &enrichment) {
            Ok(nodes) => nodes,
            Err(error) => return Outcome::Failed(Failure::Mapping(error)),
        };
        let sobjects: Vec<(String, String)> = nodes
            .iter()
            .map(|n| (n.reference_id.clone(), sobject_of(&n.url).to_owned()))
            .collect();
        let deletes: Vec<Subrequest> = nodes
            .iter()
            .filter(|n| n.method == "DELETE")
            .cloned()
            .collect();
        let relating = tenant.config.org.duplicate_rule == DuplicateRulePolicy::RelateToExisting;
        // Records already known to be duplicates of existing ones are written as those from
        // the start: the next version does not meet the rule again.
        let (sent, mut related) = if relating {
            self.remembered_duplicates(&event.tenant, nodes)
        } else {
            (nodes, Vec::new())
        };
        // Shared with the batcher, which serialises them without a copy.
        let mut sent = Arc::new(sent);
        let remembered = related.clone();
        // Each send, first or repaired, submits the nodes as they are now.
        let submit = |sent: &Arc<Vec<Subrequest>>, related: &[Related]| {
            tenant.batcher.submit(
                &booking.booking_id,
                booking.version,
                sent.clone(),
                related.to_vec(),
                relations_before.clone(),
            )
        };
        let mut outcome = match submit(&sent, &related).await {
            Ok(outcome) => outcome,
            Err(stopped) => return Outcome::Failed(Failure::ShuttingDown(stopped)),
        };
        if let GraphOutcome::Answered(result, _) = &outcome
            && already_deleted(result, &deletes)
        {
            // A replay: what the mapping deletes is gone already, which rolled the graph back.
            // Write the rest without the deletes.
            Arc::make_mut(&mut sent).retain(|n| n.method != "DELETE");
            outcome = match submit(&sent, &related).await {
                Ok(outcome) => outcome,
                Err(stopped) => return Outcome::Failed(Failure::ShuttingDown(stopped)),
            };
        }
        // A graph the org refused for one record or value it can do without is sent again,
        // repaired: a refused value (INVALID_EMAIL_ADDRESS) punycoded or left out, as the
        // mapping says; a record a duplicate rule matched (DUPLICATES_DETECTED) replaced by the
        // existing record, as the tenant's duplicate_rule says. Each round repairs at least
        // one field or removes one node, so the rounds are bounded.
        let mut rounds = 0;
        while let GraphOutcome::Answered(result, _) = &outcome
            && !result.is_successful
            && rounds < MAX_REPAIR_ROUNDS
            // Boxed, as every rarely taken path here: a future held across an await is part of
            // every message's task, which is moved on each spawn.
            && let Some(repaired) = Box::pin(self.repair(tenant, relating, result, &sent)).await
        {
            match repaired {
                Repaired::Values(nodes, repairs) => {
                    self.record_repairs(event, &sobjects, &repairs);
                    sent = Arc::new(nodes);
                }
                Repaired::Related(nodes, one) => {
                    self.record_related(event, &one);
                    related.push(one);
                    sent = Arc::new(nodes);
                }
            }
            rounds += 1;
            outcome = match submit(&sent, &related).await {
                Ok(outcome) => outcome,
                Err(stopped) => return Outcome::Failed(Failure::ShuttingDown(stopped)),
            };
        }
        if let GraphOutcome::Answered(result, _) = &outcome {
            let caches = self.tenants.caches();
            if result.is_successful {
                for one in &related {
                    caches.duplicate_put(&event.tenant, one);
                }
            } else {
                // A remembered record may be gone (deleted, merged): the next attempt asks the
                // org again.
                for one in &remembered {
                    caches.duplicate_forget(&event.tenant, &one.record);
                }
            }
        }
        match &outcome {
            GraphOutcome::RequestFailed(error) => tenant.observe(Some(error)),
            GraphOutcome::Answered(..) => tenant.observe(None),
            GraphOutcome::Collapsed => {}
        }
        match outcome {
            GraphOutcome::Collapsed => Outcome::Collapsed,
            GraphOutcome::RequestFailed(error) => Outcome::Failed(Failure::Salesforce(error)),
            GraphOutcome::Answered(result, relations) if result.is_successful => {
                self.record_write(event, &result, &sobjects, &related, relations, &applied);
                Outcome::Written
            }
            GraphOutcome::Answered(result, _) => {
                // A refusal by record-level security reads like an ordinary error code
                // (DUPLICATE_VALUE, INSUFFICIENT_ACCESS_*): tell it apart, to name its fix.
                match Box::pin(crate::sharing::diagnose(
                    &tenant.client,
                    caches,
                    &result,
                    &sent,
                ))
                .await
                {
                    Some(problem) => Outcome::Failed(Failure::Sharing {
                        problem,
                        cause: result.root_error(),
                    }),
                    None => Outcome::Failed(Failure::Rejected {
                        cause: result.root_error(),
                    }),
                }
            }
        }
    }

    /// The nodes to send again after `result` refused a value or a record the tenant lets be
    /// repaired (see the loop in [`Pipeline::write`]); `None` when the refusal is of another
    /// kind, or the tenant says it fails the booking.
    async fn repair(
        &self,
        tenant: &Tenant,
        relating: bool,
        result: &GraphResult,
        sent: &[Subrequest],
    ) -> Option<Repaired> {
        if let Some((nodes, repairs)) = invalid_values::repair(result, sent, &tenant.mapping) {
            return Some(Repaired::Values(nodes, repairs));
        }
        if !relating {
            return None;
        }
        let (reference, error) = duplicates::refused(result)?;
        let own = sobject_of(&sent.iter().find(|n| n.reference_id == reference)?.url);
        let (sobject, id) = duplicates::choose(own, &error.duplicate_matches())?;
        // A lookup that takes only the refused record's own type (a Lead lookup) cannot point
        // at a match of the other Who type: it is written empty, as no such record exists.
        let mut cleared = Vec::new();
        if sobject != own {
            for (node, node_sobject, field) in duplicates::referring_fields(sent, &reference) {
                let describe = self
                    .tenants
                    .caches()
                    .describe(&tenant.client, &node_sobject)
                    .await
                    .ok()
                    .flatten()?;
                let takes = describe
                    .fields
                    .iter()
                    .find(|f| f.name == field)
                    .is_some_and(|f| f.reference_to.contains(&sobject));
                if !takes {
                    cleared.push((node, field));
                }
            }
        }
        let rule = duplicates::rule_of(&error);
        let (nodes, one) = duplicates::relate(sent, &reference, (&sobject, &id), &rule, &cleared)?;
        Some(Repaired::Related(nodes, one))
    }

    /// `nodes` with every record already written as an existing one (a remembered duplicate
    /// rule match) left out and its references pointed at that record.
    fn remembered_duplicates(
        &self,
        tenant: &str,
        nodes: Vec<Subrequest>,
    ) -> (Vec<Subrequest>, Vec<Related>) {
        let caches = self.tenants.caches();
        let known: Vec<(String, Choice)> = nodes
            .iter()
            .filter(|n| n.method == "PATCH")
            .filter_map(|n| {
                let record = crate::plan::relations::keyed(&n.url)?;
                Some((
                    n.reference_id.clone(),
                    caches.duplicate_get(tenant, &record)?,
                ))
            })
            .collect();
        let mut nodes = nodes;
        let mut related = Vec::new();
        for (reference, choice) in known {
            // Chosen for the same mapping: what could not point at the record then is
            // written empty now (a changed mapping that refuses it forgets the choice).
            if let Some((next, one)) = duplicates::relate(
                &nodes,
                &reference,
                (&choice.sobject, &choice.id),
                &choice.rule,
                &choice.cleared,
            ) {
                nodes = next;
                related.push(one);
            }
        }
        (nodes, related)
    }

    /// Logs a record written as the existing record a duplicate rule matched.
    fn record_related(&self, event: &BookingEvent, related: &Related) {
        let cleared: Vec<String> = related
            .cleared
            .iter()
            .map(|(n, f)| format!("{n}.{f}"))
            .collect();
        tracing::info!(
            tenant = %event.tenant,
            booking_id = %event.booking.booking_id,
            node = %related.reference_id,
            sobject = %related.sobject,
            record_id = %related.id,
            duplicate_rule = %related.rule,
            cleared = ?cleared,
            "a duplicate rule matched an existing record; the booking is written related to it"
        );
    }

    /// Counts and logs each refused value written punycoded or dropped (the value itself is
    /// personal data and stays out of the log).
    fn record_repairs(
        &self,
        event: &BookingEvent,
        sobjects: &[(String, String)],
        repairs: &[invalid_values::Repair],
    ) {
        for repair in repairs {
            let sobject = sobjects
                .iter()
                .find(|(r, _)| *r == repair.reference_id)
                .map_or("?", |(_, s)| s.as_str());
            self.metrics
                .refused_values
                .with_label_values(&[&event.tenant, sobject, &repair.field, repair.treatment])
                .inc();
            tracing::warn!(
                tenant = %event.tenant,
                booking_id = %event.booking.booking_id,
                node = %repair.reference_id,
                sobject,
                field = %repair.field,
                error_code = %repair.error_code,
                treatment = repair.treatment,
                "the org refused a field value; the booking is written with it {}",
                if repair.treatment == "dropped" { "left out (mapping: invalid_value = \"drop\")" } else { "punycoded" }
            );
        }
    }

    /// The audit record of each record written, the ledger entry (with the Event's
    /// `relations` as the graph left them, over the entry `applied` read before), and the
    /// event's lag.
    fn record_write(
        &self,
        event: &BookingEvent,
        result: &GraphResult,
        sobjects: &[(String, String)],
        related: &[Related],
        relations: Option<Vec<Existing>>,
        applied: &LedgerRead,
    ) {
        let booking = &event.booking;
        let mut record_ids = Vec::new();
        for one in related {
            tracing::info!(
                target: "portals_crm::audit",
                tenant = event.tenant.as_str(),
                booking_id = booking.booking_id.as_str(),
                version = booking.version,
                node = one.reference_id.as_str(),
                sobject = one.sobject.as_str(),
                record_id = one.id.as_str(),
                duplicate_rule = one.rule.as_str(),
                "salesforce write related to an existing record"
            );
            self.metrics
                .duplicates_related
                .with_label_values(&[event.tenant.as_str(), one.sobject.as_str()])
                .inc();
            record_ids.push((one.reference_id.clone(), one.id.clone()));
        }
        for node in &result.graph_response.composite_response {
            let Some((id, created)) = node.written() else {
                continue;
            };
            let sobject = sobjects
                .iter()
                .find(|(r, _)| *r == node.reference_id)
                .map(|(_, s)| s.as_str())
                .unwrap_or_else(|| {
                    // The batcher adds the relation nodes after planning (crate::plan::relations).
                    if node.reference_id.starts_with(NODE_PREFIX) {
                        "EventRelation"
                    } else {
                        "?"
                    }
                });
            tracing::info!(
                target: "portals_crm::audit",
                tenant = event.tenant.as_str(),
                booking_id = booking.booking_id.as_str(),
                version = booking.version,
                sobject,
                record_id = &*id,
                created,
                "salesforce write"
            );
            record_ids.push((node.reference_id.clone(), id.into_owned()));
        }
        self.tenants.caches().ledger_put_over(
            &event.tenant,
            &booking.booking_id,
            applied,
            &LedgerEntry {
                version: booking.version,
                record_ids,
                relations,
            },
        );
        let lag = (OffsetDateTime::now_utc() - event.time)
            .as_seconds_f64()
            .max(0.0);
        self.metrics
            .lag_seconds
            .with_label_values(&[event.tenant.as_str()])
            .observe(lag);
    }
}

/// The pipeline against the emulator over HTTP, without a broker: each outcome from a body.
#[cfg(all(test, feature = "dev-tools"))]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::batch::BatchLimits;
    use crate::config::TenantConfig;
    use crate::emulator::{self, EmulatorHandle, FaultSpec, OrgSpec};
    use crate::enrich::Caches;
    use crate::tenants::{self, TenantSettings};

    struct Fixture {
        pipeline: Pipeline,
        emulator: EmulatorHandle,
        tracker: TaskTracker,
        stop: CancellationToken,
    }

    async fn fixture() -> Fixture {
        let emulator = emulator::start(
            "127.0.0.1:0".parse().expect("an address"),
            OrgSpec::demo(),
            &FaultSpec::default(),
        )
        .await
        .expect("the emulator starts");
        let mut tenant = TenantConfig::load(Path::new("config/tenants/acme.toml"))
            .expect("the shipped tenant file loads");
        tenant.org.login_url = emulator.base_url.clone();
        let metrics = Arc::new(Metrics::new());
        let timeout = Duration::from_secs(10);
        let loaded = tenants::load_tenants(vec![tenant], timeout, &metrics)
            .expect("the shipped tenant compiles");
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let settings = TenantSettings {
            batch: BatchLimits {
                max_graphs: 75,
                max_nodes: 500,
                linger: Duration::from_millis(5),
                max_in_flight: 2,
            },
            circuit_failures: 3,
            circuit_cooldown: Duration::from_secs(30),
            timeout,
        };
        let caches = Caches::temporary(metrics.clone()).expect("a temporary cache");
        let registry = Registry::new(loaded, caches, metrics.clone(), settings, &tracker, &stop);
        Fixture {
            pipeline: Pipeline::new(Arc::new(registry), metrics, 256 * 1024),
            emulator,
            tracker,
            stop,
        }
    }

    impl Fixture {
        async fn finish(self) {
            self.stop.cancel();
            self.tracker.close();
            self.tracker.wait().await;
            self.emulator.stop().await;
        }
    }

    fn sample(name: &str) -> Vec<u8> {
        std::fs::read(format!("tests/fixtures/events/{name}.json")).expect("a sample event")
    }

    #[tokio::test]
    async fn a_booking_is_written_once_then_already_applied() {
        let f = fixture().await;
        let first = f.pipeline.process(&sample("booked")).await;
        assert!(matches!(first.outcome, Outcome::Written), "{first:?}");
        assert_eq!(
            first.info,
            MessageInfo {
                tenant: "acme".into(),
                tenant_id: Some("acme".into()),
                booking_id: Some("bk_7Q2M9".into()),
                event_id: Some("evt_01JD6Q7M1V3S6".into()),
            }
        );
        assert_eq!(first.type_label, "booked");
        let again = f.pipeline.process(&sample("booked")).await;
        assert!(
            matches!(again.outcome, Outcome::AlreadyApplied),
            "{again:?}"
        );
        let newer = f.pipeline.process(&sample("rescheduled")).await;
        assert!(matches!(newer.outcome, Outcome::Written), "{newer:?}");
        f.finish().await;
    }

    #[tokio::test]
    async fn bad_input_and_unknown_tenants_fail_without_a_call() {
        let f = fixture().await;
        let invalid = f.pipeline.process(b"{not json").await;
        assert!(
            matches!(invalid.outcome, Outcome::Failed(Failure::InvalidEvent(_))),
            "{invalid:?}"
        );
        assert_eq!(
            (invalid.info.tenant.as_str(), invalid.type_label),
            ("unknown", "invalid")
        );
        let body = String::from_utf8(sample("booked"))
            .expect("UTF-8")
            .replace("\"tenantid\": \"acme\"", "\"tenantid\": \"initech\"");
        let stranger = f.pipeline.process(body.as_bytes()).await;
        assert!(
            matches!(&stranger.outcome, Outcome::Failed(Failure::UnknownTenant(t)) if t == "initech"),
            "{stranger:?}"
        );
        assert_eq!(stranger.info.tenant, "unknown");
        assert_eq!(stranger.info.tenant_id.as_deref(), Some("initech"));
        f.finish().await;
    }

    #[tokio::test]
    async fn a_refused_graph_names_its_cause() {
        let f = fixture().await;
        // Company is 255 characters at most on Lead: the graph rolls back with STRING_TOO_LONG.
        let body = String::from_utf8(sample("booked"))
            .expect("UTF-8")
            .replace("\"Globex\"", &format!("\"{}\"", "G".repeat(300)));
        let refused = f.pipeline.process(body.as_bytes()).await;
        match refused.outcome {
            Outcome::Failed(Failure::Rejected { cause: Some(error) }) => {
                assert_eq!(error.error_code, "STRING_TOO_LONG");
            }
            other => panic!("expected a rejected graph, got {other:?}"),
        }
        f.finish().await;
    }
}
