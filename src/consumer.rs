//! The AMQP consumer: connects (with backoff), declares the topology, consumes the shared work
//! queue and every configured tenant's queue with manual acks and per-consumer prefetch, hands
//! each delivery to the [`Pipeline`], has [`outcome::decide`] say its fate and the [`Settler`]
//! carry it out, reconnects on loss, and drains on shutdown. In-flight messages of a lost
//! connection are simply redelivered: every write is an idempotent upsert.
//!
//! # One consumer per queue, one set of permits
//!
//! Each consumer has a channel of its own (its deliveries' acks go out in runs, [`Acks`], which
//! another queue's slow messages must not interrupt); all share the worker's concurrency
//! permits. Each tenant queue's consumer has the tenant's limit of messages in flight as its
//! prefetch (see [`crate::tenants::Tenant::try_slot`]), so the broker never hands a worker more
//! of one tenant's queue than the tenant may process; the shared queue keeps `amqp.prefetch`.
//!
//! The loop holds at most one permit while it waits, and waits on every consumer at once (their
//! streams merged), taking whichever delivery comes first. A delivery from the shared queue
//! whose tenant is at its limit is parked ([`Admission::Park`]); one from a tenant's queue waits
//! for a slot of its tenant instead ([`Admission::Wait`]), so the tenant's backlog stays in its
//! queue (parking goes through a retry tier, which leads to the shared queue).
//!
//! Why no consumer can starve the others, and nothing can deadlock: a permit is held either by
//! that one wait, which any consumer's delivery ends, or by a task processing one delivery.
//! Such a task may wait for one thing only, a slot of its own tenant, and slots are returned by
//! that tenant's writes already in flight, which wait for nothing but Salesforce (answer or
//! timeout); then the task settles (a confirmed publish or an ack) and releases its permit. So
//! every permit comes back, and a consumer with nothing to deliver holds none. A tenant holds at
//! most its queue's prefetch plus its limit of permits (its limit each: waiting, in flight).
//!
//! Reloads: a tenant added gets its queue, bindings and consumer; a removed tenant's bindings
//! go first (its new events reach the shared queue), then its consumer is cancelled and what
//! the broker had already sent it is handed back to its queue (`basic.nack` with requeue), which
//! is kept: it may hold bookings. Once the broker has ended that consumer and its messages in
//! flight are settled, its channel closes ([`Feeds::retire`]), so tenants added and removed over
//! a long-lived connection leave no channels behind.
//!
//! # Shutdown order and its guarantee
//!
//! On `cancel`: (1) take no more deliveries and `basic.cancel` every consumer, so the broker sends
//! no more; (2) drain: every message already taken is processed and settled (acked once
//! Salesforce committed its graph) until `drain`; (3) if the drain deadline passes, stop the
//! batchers (they send what they hold, then refuse new graphs) and keep waiting, the channel
//! still open, for the requests on the wire until `grace` − [`CLOSE_BUDGET`]: a graph Salesforce
//! commits then is still acked; (4) the settle barrier (see [`settle_barrier`]): every ack still
//! held for a run is sent, then a synchronous round trip through every queue consumed (the
//! shared one, each tenant's, and each removed tenant's whose channel is still open, on its
//! channel) returns only once each has taken in every ack sent before it; (5) close the
//! connection,
//! which hands back every message not acked.
//!
//! Guarantee: after a graceful stop, every message whose graph Salesforce answered as committed
//! before step (4) is acked at the queue, so no committed booking is redelivered. Only a request
//! still unanswered at the end of the grace can commit unacked; it is redelivered and rewritten
//! idempotently (or counted superseded).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream, SelectAll};
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use prometheus::{IntCounterVec, IntGaugeVec};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::amqp::{self, Acks, PublishError, Publisher, Topology, acks};
use crate::outcome::{self, Disposition, Reason, SettleError, Settled, Settler, dead_letter};
use crate::pipeline::Pipeline;
use crate::retry_policy::Reconnect;
use crate::telemetry::http::Readiness;
use crate::telemetry::logging::redact;
use crate::telemetry::metrics::Metrics;
use crate::tenants::Admission;

/// Worker settings taken from [`crate::config::Config`].
#[derive(Clone)]
pub struct WorkerSettings {
    /// Broker URL.
    pub url: secrecy::SecretString,
    /// Heartbeat interval, seconds.
    pub heartbeat_secs: u16,
    /// Prefetch of the shared queue's consumer (unacked deliveries the broker may push to this
    /// worker from it); each tenant queue's consumer has the tenant's in-flight limit instead.
    pub prefetch: u16,
    /// Messages processed at once.
    pub concurrency: usize,
    /// How long a shutdown waits for in-flight messages to settle.
    pub drain: Duration,
    /// After the drain deadline, how much longer a shutdown keeps the connection open for the
    /// requests already sent to Salesforce (and then for the settle barrier and the close).
    pub grace: Duration,
}

/// The part of the stop grace kept for the settle barrier and the connection close
/// (a second each); the requests still on the wire get the rest.
pub const CLOSE_BUDGET: Duration = Duration::from_secs(2);

/// How long the settle barrier, and then the connection close, may each take.
const STEP_TIMEOUT: Duration = Duration::from_secs(1);

/// What a consumer needs besides its settings.
#[derive(Clone)]
pub struct Consumer {
    /// Where the work queue and the retry and dead-letter queues are.
    pub topology: Arc<Topology>,
    /// Processes each delivery.
    pub pipeline: Arc<Pipeline>,
    /// Counts what happens.
    pub metrics: Arc<Metrics>,
    /// Reports the broker connection to `/readyz`.
    pub readiness: Arc<Readiness>,
}

/// Why a connection's session ended before shutdown: the two read differently at 3 a.m. — a
/// broker never reached is a configuration or network problem, a lost one an outage.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The connection did not open.
    #[error(transparent)]
    Unreachable(amqp::ConnectError),
    /// The connection opened, then failed.
    #[error(transparent)]
    Lost(lapin::Error),
    /// The connection opened, and the broker refused to declare the topology or to start a
    /// consumer on it: a permission, or a queue that exists with other arguments.
    #[error(transparent)]
    Refused(amqp::Refused),
}

/// An error of setting up the topology or a consumer: a refusal when the broker sent one.
impl From<lapin::Error> for SessionError {
    fn from(error: lapin::Error) -> Self {
        match amqp::Refused::from_error(error) {
            Ok(refused) => Self::Refused(refused),
            Err(error) => Self::Lost(error),
        }
    }
}

impl Consumer {
    /// Consumes until `cancel`, reconnecting with backoff whenever the connection is lost; on
    /// `cancel`, stops in the order the module documents, cancelling `stop_batchers` when the
    /// drain deadline passes.
    pub async fn run(
        self,
        settings: WorkerSettings,
        cancel: CancellationToken,
        stop_batchers: CancellationToken,
    ) {
        let mut backoff = Reconnect::new(Duration::from_millis(200), Duration::from_secs(30));
        let permits = Arc::new(Semaphore::new(settings.concurrency));
        let mut first = true;
        // The tenants whose queues the last connection consumed: one removed while the
        // connection was down still has its bindings removed.
        let mut known = Vec::new();
        while !cancel.is_cancelled() {
            if !first {
                self.metrics.amqp_reconnects.inc();
            }
            first = false;
            let session = self
                .consume_once(
                    &settings,
                    &permits,
                    &cancel,
                    &stop_batchers,
                    &mut backoff,
                    &mut known,
                )
                .await;
            self.readiness.set_broker(false);
            self.metrics.amqp_connected.set(0);
            // The next connection declares every tenant's queue again; until then this worker
            // consumes none, refused or not.
            self.metrics.tenant_queue_refused.reset();
            if let Err(ended) = session {
                let delay = backoff.next_delay();
                let retry_in_ms = delay.as_millis() as u64;
                match ended {
                    SessionError::Unreachable(error) => {
                        self.readiness.set_broker_down(format!(
                            "not connected to the broker (could not connect to the broker at {} — check: {})",
                            error.endpoint, error.check
                        ));
                        tracing::warn!(
                            error = %error.error,
                            endpoint = %error.endpoint,
                            check = error.check,
                            retry_in_ms,
                            "could not connect to the broker"
                        );
                    }
                    SessionError::Refused(refused) => {
                        self.readiness
                            .set_broker_down(format!("the broker refused the topology: {refused}"));
                        // Not an outage: nothing changes until someone acts on the check.
                        tracing::error!(
                            error = %refused.error,
                            check = refused.check,
                            retry_in_ms,
                            "the broker refused the topology"
                        );
                    }
                    SessionError::Lost(error) => {
                        self.readiness.set_broker_down(format!(
                            "not connected to the broker (connection lost: {error})"
                        ));
                        tracing::warn!(%error, retry_in_ms, "broker connection lost");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => {}
                }
            }
        }
    }

    /// One connection's life: declare, consume until `cancel` or loss, drain, close.
    async fn consume_once(
        &self,
        settings: &WorkerSettings,
        permits: &Arc<Semaphore>,
        cancel: &CancellationToken,
        stop_batchers: &CancellationToken,
        backoff: &mut Reconnect,
        known: &mut Vec<String>,
    ) -> Result<(), SessionError> {
        let topology = &self.topology;
        // The queue in the name tells ops (and `rabbitmqctl list_connections`) which worker it is.
        let name = format!("portals-crm worker {}", topology.work_queue);
        // Raced against the shutdown: a broker that does not answer must not hold a SIGTERM
        // for the connect timeout.
        let connection = tokio::select! {
            connected = amqp::connect(&settings.url, settings.heartbeat_secs, &name) => {
                connected.map_err(SessionError::Unreachable)?
            }
            () = cancel.cancelled() => return Ok(()),
        };
        let publisher = Publisher::open(&connection).await?;
        topology.declare(publisher.channel()).await?;
        publisher.check_default_exchange().await?;
        // Set by a message whose retry or dead-letter copy failed on the publisher's channel:
        // the broker closed it (a publish it refused), so every later publish would fail too
        // and each message be redelivered unsettled; the session ends and starts over.
        let broken = Arc::new(Broken::default());
        let mut feeds = Feeds::new(
            publisher.clone(),
            topology.clone(),
            self.metrics.amqp_acks.clone(),
            self.metrics.tenant_queue_refused.clone(),
        );
        feeds.shared = Some(
            feeds
                .consume(&connection, &topology.work_queue, settings.prefetch)
                .await?,
        );
        let registry = self.pipeline.tenants();
        let mut names = registry.watch_names();
        let tenant_prefetch = u16::try_from(registry.in_flight_limit()).unwrap_or(u16::MAX);
        let wanted = names.borrow_and_update().clone();
        for gone in known.iter().filter(|t| !wanted.contains(t)) {
            unbind_tenant(&connection, topology, gone, "removed").await?;
        }
        feeds.follow(&connection, &wanted, tenant_prefetch).await?;
        self.readiness.set_broker(true);
        self.metrics.amqp_connected.set(1);
        backoff.reset();
        tracing::info!(
            queue = %topology.work_queue,
            prefetch = settings.prefetch,
            tenant_queues = feeds.tenants.len(),
            tenant_prefetch,
            "consuming"
        );
        let in_flight = TaskTracker::new();
        let mut following = true;
        // Armed once, reset after each try: nothing per delivery.
        let refused_again = tokio::time::sleep(REFUSED_TRIED_AGAIN_AFTER);
        tokio::pin!(refused_again);
        let result = loop {
            // Wait for a slot first, so a delivery is only taken when it can start; both waits
            // race the shutdown. One permit waits for every consumer at once (module docs).
            let permit = tokio::select! {
                () = cancel.cancelled() => break Ok(()),
                () = broken.token.cancelled() => break Err(broken.session_error()),
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break Ok(()),
                },
            };
            let (delivery, admission, (settler, lane_token)) = tokio::select! {
                () = cancel.cancelled() => break Ok(()),
                () = broken.token.cancelled() => break Err(broken.session_error()),
                changed = names.changed(), if following => {
                    match changed {
                        Ok(()) => {
                            let wanted = names.borrow_and_update().clone();
                            if let Err(error) = feeds
                                .follow(&connection, &wanted, tenant_prefetch)
                                .await
                            {
                                break Err(SessionError::from(error));
                            }
                            refused_again
                                .as_mut()
                                .reset(tokio::time::Instant::now() + REFUSED_TRIED_AGAIN_AFTER);
                        }
                        // The registry is gone, so is any reload: the tenants stay as they are.
                        Err(_) => following = false,
                    }
                    continue;
                }
                () = &mut refused_again, if !feeds.refused.is_empty() => {
                    let wanted = names.borrow().clone();
                    if let Err(error) = feeds.follow(&connection, &wanted, tenant_prefetch).await {
                        break Err(SessionError::from(error));
                    }
                    refused_again
                        .as_mut()
                        .reset(tokio::time::Instant::now() + REFUSED_TRIED_AGAIN_AFTER);
                    continue;
                }
                next = feeds.streams.next() => match next {
                    Some((tag, Some(Ok(delivery)))) => {
                        let Some(lane) = feeds.lanes.get(&tag) else {
                            // Every consumer's stream is pushed with its lane.
                            continue;
                        };
                        if feeds.retiring.contains(&tag) {
                            // A removed tenant's: back to its queue, which is kept.
                            if let Err(error) = lane
                                .acks
                                .nack(&delivery, BasicNackOptions { requeue: true, multiple: false })
                                .await
                            {
                                break Err(SessionError::Lost(error));
                            }
                            continue;
                        }
                        (
                            delivery,
                            feeds.admission(&tag),
                            (lane.settler.clone(), lane.in_flight.token()),
                        )
                    }
                    Some((_, Some(Err(error)))) => break Err(SessionError::Lost(error)),
                    Some((tag, None)) if feeds.retiring.remove(&tag) => {
                        feeds.retire(&tag);
                        continue;
                    }
                    // The broker cancelled a consumer we did not (its queue was deleted) or
                    // the connection closed: start over, declaring everything again.
                    Some((_, None)) | None => break Err(SessionError::Lost(lapin::Error::from(
                        lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
                    ))),
                }
            };
            let consumer = self.clone();
            let broken = broken.clone();
            in_flight.spawn(async move {
                let _lane = lane_token;
                // The permit goes back once the message's outcome is durable, before its ack's
                // answer (which may wait for a run of acks); the task stays tracked until then.
                consumer
                    .handle(delivery, admission, &settler, &broken, move || drop(permit))
                    .await;
            });
        };
        *known = feeds.tenants.keys().cloned().collect();
        in_flight.close();
        if cancel.is_cancelled() {
            self.stop(&mut feeds, &in_flight, settings, stop_batchers)
                .await;
        } else if tokio::time::timeout(settings.drain, in_flight.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "connection lost; messages still in flight are redelivered by the broker"
            );
        }
        let closed = tokio::time::timeout(
            STEP_TIMEOUT,
            connection.close(200, "portals-crm shutting down".into()),
        )
        .await;
        if !matches!(closed, Ok(Ok(()))) {
            tracing::debug!("the connection was not closed cleanly; the broker drops it");
        }
        let acking = feeds.acking.clone();
        drop(feeds);
        acking.close();
        if tokio::time::timeout(STEP_TIMEOUT, acking.wait())
            .await
            .is_err()
        {
            // Messages still in flight hold the acknowledgements open; their acks find the
            // channel closed and they are redelivered.
            tracing::debug!("acknowledgements still open after the connection closed");
        }
        result
    }

    /// Steps (1) to (4) of the shutdown order in the module documentation (`feeds` is `&mut`
    /// only because its streams are not `Sync`).
    async fn stop(
        &self,
        feeds: &mut Feeds,
        in_flight: &TaskTracker,
        settings: &WorkerSettings,
        stop_batchers: &CancellationToken,
    ) {
        let started = tokio::time::Instant::now();
        for tag in feeds.tags.values() {
            let Some(lane) = feeds.lanes.get(tag) else {
                continue;
            };
            if let Err(error) = lane
                .channel
                .basic_cancel(tag.as_ref().into(), BasicCancelOptions::default())
                .await
            {
                tracing::warn!(%error, "could not cancel a consumer; the connection close will");
            }
        }
        let drained = |deadline| async move {
            let done = tokio::time::timeout_at(deadline, in_flight.wait())
                .await
                .is_ok();
            if !done {
                tracing::warn!(in_flight = in_flight.len(), "messages still in flight");
            }
            done
        };
        let drain_deadline = started + settings.drain;
        if !drained(drain_deadline).await {
            tracing::warn!(
                "drain deadline passed; the requests already sent to Salesforce get the stop grace"
            );
            stop_batchers.cancel();
            if !drained(drain_deadline + settings.grace.saturating_sub(CLOSE_BUDGET)).await {
                tracing::warn!(
                    "stop grace passed; unsettled messages go back to the queue with the connection"
                );
            }
        }
        // Every lane at once, each on its own channel: one lane's failure (a removed tenant's
        // queue deleted meanwhile) must not cost the others their barrier, nor their time.
        // Removed tenants' lanes settle on their own (Feeds::retire), meanwhile.
        feeds.stopping.cancel();
        feeds.retired.close();
        let retired = async {
            if tokio::time::timeout(STEP_TIMEOUT, feeds.retired.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "a removed tenant's channel did not settle; the connection close hands back what it holds"
                );
            }
        };
        futures_util::future::join(
            futures_util::future::join_all(feeds.lanes.values().map(Lane::settle_acks)),
            retired,
        )
        .await;
    }

    /// Processes one delivery and settles it; the only caller of [`Settler::settle`].
    async fn handle(
        &self,
        delivery: Delivery,
        admission: Admission,
        settler: &Settler,
        broken: &Broken,
        release: impl FnOnce() + Send,
    ) {
        let started = Instant::now();
        let _in_flight = InFlight::count(&self.metrics.inflight);
        let attempt = dead_letter::attempts(delivery.properties.headers().as_ref()) + 1;
        let span = tracing::info_span!(
            "message",
            event_id = tracing::field::Empty,
            tenant = tracing::field::Empty,
            booking_id = tracing::field::Empty,
            attempt
        );
        let unsettled = settler.guard(&delivery);
        async {
            let processed = self
                .pipeline
                .process_admitted(&delivery.data, admission)
                .await;
            let span = tracing::Span::current();
            let info = processed.info;
            span.record("tenant", info.tenant.as_str());
            if let Some(id) = &info.event_id {
                // As long as the publisher made it: cut as in the dead letter's header, so
                // that it does not fill every line of the message's log.
                span.record("event_id", &*dead_letter::cut(id));
            }
            if let Some(id) = &info.booking_id {
                span.record("booking_id", id.as_str());
            }
            let disposition = outcome::decide(processed.outcome);
            match &disposition {
                // Routine under load (a slow org's backlog cycles through the first tier):
                // counted in `portals_crm_tenant_busy_total`, not worth a warning each.
                Disposition::Wait { cause, .. } if cause.reason == Reason::TenantBusy => {
                    tracing::debug!(reason = %cause.reason, "booking parked");
                }
                Disposition::Retry { cause, .. }
                | Disposition::Wait { cause, .. }
                | Disposition::DeadLetter(cause) => {
                    // Masked whole, then cut as in the dead letter's header.
                    let message = redact(&cause.message);
                    tracing::warn!(reason = %cause.reason, message = %dead_letter::cut(&message), "booking not written");
                }
                Disposition::Written | Disposition::Superseded => {}
            }
            unsettled.disarm();
            match settler.settle(&delivery, &info, disposition, release).await {
                Ok(settled) => {
                    self.count(&info.tenant, processed.type_label, settled);
                    self.metrics
                        .processing(&info.tenant)
                        .observe(started.elapsed().as_secs_f64());
                }
                Err(error) => {
                    tracing::error!(%error, "message not settled; the broker will redeliver it");
                    if let SettleError::Publish {
                        source: PublishError::Broker(error),
                        ..
                    } = error
                    {
                        broken.report(error);
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }

    fn count(&self, tenant: &str, type_label: &str, settled: Settled) {
        self.metrics
            .events_settled
            .with_label_values(&[tenant, type_label, settled.label()])
            .inc();
        match settled {
            Settled::Retried { tier } => self
                .metrics
                .retries
                .with_label_values(&[tenant, &tier.to_string()])
                .inc(),
            Settled::DeadLettered { reason } => self
                .metrics
                .dead_letters
                .with_label_values(&[tenant, &reason.label()])
                .inc(),
            Settled::Written | Settled::Superseded => {}
        }
    }
}

/// One consumer's deliveries, tagged with its consumer tag; `None` once the broker ended it.
type Feed = BoxStream<'static, (Arc<str>, Option<Result<Delivery, lapin::Error>>)>;

/// One consumer with the channel it has to itself, and what settles its deliveries. Delivery
/// tags, and so runs of acknowledgements ([`Acks`]), are per channel: on its own channel, a
/// queue whose messages stay in flight long (a slow org's) never holds back the acks of
/// another's.
struct Lane {
    channel: Channel,
    /// The queue it consumes.
    queue: String,
    /// The channel's acknowledgements.
    acks: Acks,
    /// Settles its deliveries (through `acks`).
    settler: Settler,
    /// Its messages in flight, one token each: a retired lane's channel closes only once they
    /// are settled ([`Feeds::retire`]).
    in_flight: TaskTracker,
}

impl Lane {
    /// Sends the acks held back and waits until the broker has taken in every ack sent on the
    /// channel ([`settle_barrier`]), within [`STEP_TIMEOUT`]; a failure is logged (the broker
    /// redelivers what it did not take in).
    async fn settle_acks(&self) {
        // Acks held behind a message still in flight go out now, before the barrier.
        self.acks.flush().await;
        let barrier = settle_barrier(&self.channel, &self.acks, &self.queue);
        match tokio::time::timeout(STEP_TIMEOUT, barrier).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                queue = %self.queue,
                %error,
                "settle barrier failed; acks sent last may be redelivered"
            ),
            Err(_) => tracing::warn!(
                queue = %self.queue,
                "settle barrier timed out; acks sent last may be redelivered"
            ),
        }
    }
}

/// The consumers of one connection, one channel each: the shared queue's and one per configured
/// tenant (see the module documentation).
struct Feeds {
    publisher: Publisher,
    topology: Arc<Topology>,
    /// `portals_crm_amqp_acks_total`, for every lane's acknowledgements.
    acks_counted: IntCounterVec,
    /// Every consumer's deliveries, merged.
    streams: SelectAll<Feed>,
    /// Every consumer's lane by its consumer tag, kept until the connection closes (a retired
    /// consumer's messages in flight still settle on its channel).
    lanes: HashMap<Arc<str>, Lane>,
    /// Consumer tag by queue, of the consumers still taking deliveries.
    tags: HashMap<String, Arc<str>>,
    /// Queue by tenant, of the tenants whose queue is consumed.
    tenants: BTreeMap<String, String>,
    /// The tenants whose queue the broker refused (their events use the shared queue), tried
    /// again every [`REFUSED_TRIED_AGAIN_AFTER`]; each is 1 in `refused_gauge`, a tenant whose
    /// queue is consumed 0.
    refused: BTreeSet<String>,
    /// `portals_crm_tenant_queue_refused{tenant}`.
    refused_gauge: IntGaugeVec,
    /// Tags of consumers cancelled for a removed tenant, until the broker ends them: what they
    /// still deliver goes back to the queue.
    retiring: HashSet<Arc<str>>,
    /// The shared queue's consumer tag.
    shared: Option<Arc<str>>,
    /// The lanes' acknowledgement tasks, which end with the last handle.
    acking: TaskTracker,
    /// Lanes of removed tenants settling before their channel closes ([`Feeds::retire`]).
    retired: TaskTracker,
    /// Cancelled by the shutdown's settle barrier: a retired lane with a message still in
    /// flight settles its acks then, as every other lane does.
    stopping: CancellationToken,
}

impl Feeds {
    fn new(
        publisher: Publisher,
        topology: Arc<Topology>,
        acks_counted: IntCounterVec,
        refused_gauge: IntGaugeVec,
    ) -> Self {
        Self {
            publisher,
            topology,
            acks_counted,
            streams: SelectAll::new(),
            lanes: HashMap::new(),
            tags: HashMap::new(),
            tenants: BTreeMap::new(),
            refused: BTreeSet::new(),
            refused_gauge,
            retiring: HashSet::new(),
            shared: None,
            acking: TaskTracker::new(),
            retired: TaskTracker::new(),
            stopping: CancellationToken::new(),
        }
    }

    /// What a delivery of consumer `tag` does when its tenant is at its limit: parked from the
    /// shared queue, waiting from a tenant's queue (see [`Admission`]).
    fn admission(&self, tag: &Arc<str>) -> Admission {
        if self.shared.as_ref() == Some(tag) {
            Admission::Park
        } else {
            Admission::Wait
        }
    }

    /// Consumes `queue` on a channel of its own with its own prefetch. Per-consumer QoS
    /// (`global = false`): global QoS on a quorum queue closes the connection
    /// (`rabbitmq-notes.md` §1).
    async fn consume(
        &mut self,
        connection: &Connection,
        queue: &str,
        prefetch: u16,
    ) -> Result<Arc<str>, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let tag: Arc<str> = consumer.tag().as_str().into();
        let end = tag.clone();
        let tagged = tag.clone();
        self.streams.push(
            consumer
                .map(move |delivery| (tagged.clone(), Some(delivery)))
                .chain(stream::once(async move { (end, None) }))
                .boxed(),
        );
        let acks = Acks::start(&self.acking, acks::HOLD, self.acks_counted.clone());
        let settler = Settler::new(self.publisher.clone(), self.topology.clone(), acks.clone());
        self.lanes.insert(
            tag.clone(),
            Lane {
                channel,
                queue: queue.to_owned(),
                acks,
                settler,
                in_flight: TaskTracker::new(),
            },
        );
        self.tags.insert(queue.to_owned(), tag.clone());
        Ok(tag)
    }

    /// Consumes the queue of every tenant in `wanted` not consumed yet (declaring it and its
    /// bindings), and stops consuming the others, their bindings removed first.
    ///
    /// Each tenant's queue is declared, and unbound, on a channel of its own: a queue the broker
    /// refuses (one made by hand with other arguments, a permission missing) closes only that
    /// channel, and only that tenant's events go to the shared queue, which an unbound tenant's
    /// reach through the route exchange's alternate exchange; it is tried again on the next
    /// change of the tenants, every [`REFUSED_TRIED_AGAIN_AFTER`] and on the next connection.
    async fn follow(
        &mut self,
        connection: &Connection,
        wanted: &[String],
        prefetch: u16,
    ) -> Result<(), lapin::Error> {
        for tenant in wanted {
            if self.tenants.contains_key(tenant) {
                continue;
            }
            let own = connection.create_channel().await?;
            let declared = self.topology.declare_tenant(&own, tenant).await;
            if own.status().connected() {
                let _ = own.close(200, "tenant queue declared".into()).await;
            }
            let consumed = match declared {
                Ok(Some(queue)) => self
                    .consume(connection, &queue, prefetch)
                    .await
                    .map(|_| Some(queue)),
                not_declared => not_declared,
            };
            match consumed.map_err(amqp::Refused::from_error) {
                Ok(Some(queue)) => {
                    tracing::info!(%tenant, %queue, "consuming the tenant's queue");
                    self.refused.remove(tenant);
                    self.refused_gauge.with_label_values(&[tenant]).set(0);
                    self.tenants.insert(tenant.clone(), queue);
                }
                Ok(None) => tracing::warn!(
                    %tenant,
                    "tenant id too long for a queue name; its events use the shared queue"
                ),
                Err(Ok(refused)) => {
                    tracing::error!(
                        %tenant,
                        error = %refused.error,
                        check = refused.check,
                        tried_again = TRIED_AGAIN,
                        "the broker refused the tenant's queue; its events use the shared queue"
                    );
                    self.refused_gauge.with_label_values(&[tenant]).set(1);
                    self.refused.insert(tenant.clone());
                    // A queue left bound (declared, then not consumed; or bound by an earlier
                    // release) would take the tenant's events where nobody reads them.
                    unbind_tenant(connection, &self.topology, tenant, "refused").await?;
                }
                Err(Err(error)) => return Err(error),
            }
        }
        let dropped: Vec<String> = self
            .refused
            .iter()
            .filter(|tenant| !wanted.contains(tenant))
            .cloned()
            .collect();
        for tenant in dropped {
            self.refused.remove(&tenant);
            let _ = self.refused_gauge.remove_label_values(&[&tenant]);
        }
        let removed: Vec<(String, String)> = self
            .tenants
            .iter()
            .filter(|(tenant, _)| !wanted.contains(tenant))
            .map(|(t, q)| (t.clone(), q.clone()))
            .collect();
        for (tenant, queue) in removed {
            unbind_tenant(connection, &self.topology, &tenant, "removed").await?;
            let _ = self.refused_gauge.remove_label_values(&[&tenant]);
            if let Some(tag) = self.tags.remove(&queue)
                && let Some(lane) = self.lanes.get(&tag)
            {
                self.retiring.insert(tag.clone());
                lane.channel
                    .basic_cancel(tag.as_ref().into(), BasicCancelOptions::default())
                    .await?;
            }
            tracing::info!(%tenant, %queue, "tenant removed; its queue is kept and no longer consumed");
            self.tenants.remove(&tenant);
        }
        Ok(())
    }

    /// Closes the channel of a removed tenant's consumer `tag` once the broker has ended the
    /// consumer (nothing more is delivered on it), its messages in flight are settled and the
    /// broker has taken in their acks. Kept until the connection closed, each removal of a
    /// tenant would leave one channel open on the connection for good.
    fn retire(&mut self, tag: &Arc<str>) {
        let Some(lane) = self.lanes.remove(tag) else {
            return;
        };
        let stopping = self.stopping.clone();
        self.retired.spawn(async move {
            lane.in_flight.close();
            let settled = tokio::select! {
                () = lane.in_flight.wait() => true,
                // A message still in flight when the shutdown comes (its request unanswered at
                // the end of the grace): the acks sent so far are made durable now, and the
                // connection's close hands the rest back.
                () = stopping.cancelled() => false,
            };
            lane.settle_acks().await;
            if settled {
                let _ = lane.channel.close(200, "tenant removed".into()).await;
            }
        });
    }
}

/// How long a tenant queue the broker refused waits before it is declared again (besides on a
/// reload of the tenant files and on a new connection): a fixed permission or a queue moved
/// aside takes effect within this, without anyone's action on the worker. Each attempt opens two
/// channels and logs the refusal again.
const REFUSED_TRIED_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// When a tenant queue the broker refused is declared again, for the log.
const TRIED_AGAIN: &str = "in a minute, on the next reload of the tenant files (touch the tenant's file, or SIGHUP) and on the next connection";

/// Removes `tenant`'s bindings on a channel of its own (`why`: `removed` or `refused`). A
/// refusal closes only that channel and is logged, not returned: one tenant's queue must not
/// stop every tenant's consumption.
///
/// # Errors
/// Anything but the broker's refusal (the connection failed).
async fn unbind_tenant(
    connection: &Connection,
    topology: &Topology,
    tenant: &str,
    why: &'static str,
) -> Result<(), lapin::Error> {
    let own = connection.create_channel().await?;
    match topology.forget_tenant(&own, tenant).await {
        Ok(()) => {
            let _ = own.close(200, "tenant queue unbound".into()).await;
            Ok(())
        }
        // No such queue: nothing bound to it either.
        Err(error) if is_not_found(&error) => Ok(()),
        Err(error) => match amqp::Refused::from_error(error) {
            Ok(refused) => {
                tracing::error!(
                    %tenant,
                    tenant_queue = why,
                    error = %refused.error,
                    check = refused.check,
                    "the broker refused to unbind the tenant's queue; the tenant's events may still reach it"
                );
                Ok(())
            }
            Err(error) => Err(error),
        },
    }
}

/// Whether the broker answered `NOT_FOUND` (404): the queue or exchange does not exist.
fn is_not_found(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(reply)
        if matches!(reply.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Returns once `queue` has taken in every ack sent on `channel` before it, so that a
/// connection closed afterwards cannot lose them.
///
/// Why it is needed: an ack is not answered in AMQP 0-9-1, and a RabbitMQ quorum queue does not
/// apply an ack the moment the channel reads it. The channel forwards acks to the queue's Raft
/// log; once 32 of its commands are not yet applied it holds further acks back
/// (`rabbit_fifo_client:settle/3`, `unsent_commands`) and forwards them when the queue reports
/// progress. When the channel closes first, the held acks are dropped
/// (`rabbit_quorum_queue:close/1` does nothing with them) and the queue redelivers those
/// messages: <https://github.com/rabbitmq/rabbitmq-server/issues/10327>. A drain ends with a
/// burst of acks (a Composite Graph answers up to 75 bookings at once), so closing right after it
/// redelivered committed bookings.
///
/// How: `basic.get` on the queue is a synchronous command through the same Raft log. It is
/// answered after everything the channel forwarded before it was applied, and the queue's
/// progress reports for those commands reach the channel before the answer, which makes the
/// channel forward the held acks before it handles anything we send after the answer (RabbitMQ 4
/// also forwards held acks before a `basic.cancel`, but ours is sent before the drain). A message
/// the get takes is handed straight back (`basic.reject` with requeue).
///
/// The message taken is a delivery of the channel too: it is rejected through `acks`, so runs of
/// acknowledgements after it can pass its tag.
async fn settle_barrier(channel: &Channel, acks: &Acks, queue: &str) -> Result<(), lapin::Error> {
    let taken = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?;
    if let Some(message) = taken {
        acks.reject(&message.delivery, BasicRejectOptions { requeue: true })
            .await?;
    }
    Ok(())
}

/// The publisher's channel failed under a session ([`Consumer::consume_once`]): the first error
/// met, and the token that ends the session.
#[derive(Default)]
struct Broken {
    token: CancellationToken,
    first: std::sync::Mutex<Option<lapin::Error>>,
}

impl Broken {
    fn report(&self, error: lapin::Error) {
        self.first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(error);
        self.token.cancel();
    }

    /// The session's end: a refusal when the first error was the broker's (`ACCESS_REFUSED` on
    /// a publish), else a lost channel.
    fn session_error(&self) -> SessionError {
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
        SessionError::from(first.unwrap_or_else(|| {
            lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closed,
                "the publisher's channel closed",
            )
            .into()
        }))
    }
}

/// One message in `portals_crm_inflight_events` while it lives: given back when dropped, also
/// when processing unwinds from a panic.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn count(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_publisher_ends_the_session_with_its_first_error_classified() {
        let broken = Broken::default();
        assert!(!broken.token.is_cancelled());
        let refusal = lapin::Error::from(lapin::ErrorKind::ProtocolError(
            lapin::protocol::AMQPError::new(
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - access to exchange 'amq.default' in vhost '/' refused for user 'u'"
                    .into(),
            ),
        ));
        broken.report(refusal);
        // Later publishes on the closed channel fail too; the first error says why.
        broken.report(
            lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "basic.publish")
                .into(),
        );
        assert!(broken.token.is_cancelled());
        match broken.session_error() {
            SessionError::Refused(refused) => {
                assert!(
                    refused.error.to_string().contains("amq.default"),
                    "{refused}"
                );
            }
            other => panic!("not a refusal: {other}"),
        }
        // Without an error recorded: a lost channel.
        assert!(matches!(
            Broken::default().session_error(),
            SessionError::Lost(_)
        ));
    }
}
