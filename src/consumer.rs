//! The AMQP consumer: connects (with backoff), declares the topology, consumes the work queue
//! with manual acks and per-consumer prefetch, hands each delivery to the [`Pipeline`], has
//! [`outcome::decide`] say its fate and the [`Settler`] carry it out, reconnects on loss, and
//! drains on shutdown. In-flight messages of a lost connection are simply redelivered: every
//! write is an idempotent upsert.
//!
//! # Shutdown order and its guarantee
//!
//! On `cancel`: (1) take no more deliveries and `basic.cancel` the consumer, so the broker sends
//! no more; (2) drain: every message already taken is processed and settled (acked once
//! Salesforce committed its graph) until `drain`; (3) if the drain deadline passes, stop the
//! batchers (they send what they hold, then refuse new graphs) and keep waiting, the channel
//! still open, for the requests on the wire until `grace` − [`CLOSE_BUDGET`]: a graph Salesforce
//! commits then is still acked; (4) the settle barrier (see [`settle_barrier`]): a synchronous
//! round trip through the work queue that returns only once the queue has taken in every ack
//! sent before it; (5) close the connection, which hands back every message not acked.
//!
//! Guarantee: after a graceful stop, every message whose graph Salesforce answered as committed
//! before step (4) is acked at the queue, so no committed booking is redelivered. Only a request
//! still unanswered at the end of the grace can commit unacked; it is redelivered and rewritten
//! idempotently (or counted superseded).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::amqp::{self, Publisher, Topology};
use crate::outcome::{self, Disposition, Reason, Settled, Settler, dead_letter};
use crate::pipeline::Pipeline;
use crate::retry_policy::Reconnect;
use crate::telemetry::http::Readiness;
use crate::telemetry::logging::redact;
use crate::telemetry::metrics::Metrics;

/// Worker settings taken from [`crate::config::Config`].
#[derive(Clone)]
pub struct WorkerSettings {
    /// Broker URL.
    pub url: secrecy::SecretString,
    /// Heartbeat interval, seconds.
    pub heartbeat_secs: u16,
    /// Per-consumer prefetch (unacked deliveries the broker may push to this worker).
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
        while !cancel.is_cancelled() {
            if !first {
                self.metrics.amqp_reconnects.inc();
            }
            first = false;
            let session = self
                .consume_once(&settings, &permits, &cancel, &stop_batchers, &mut backoff)
                .await;
            self.readiness.set_broker(false);
            self.metrics.amqp_connected.set(0);
            if let Err(error) = session {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
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
    ) -> Result<(), lapin::Error> {
        let topology = &self.topology;
        // The queue in the name tells ops (and `rabbitmqctl list_connections`) which worker it is.
        let name = format!("portals-crm worker {}", topology.work_queue);
        let connection = amqp::connect(&settings.url, settings.heartbeat_secs, &name).await?;
        let publisher = Publisher::open(&connection).await?;
        topology.declare(publisher.channel()).await?;
        let channel = connection.create_channel().await?;
        // Per-consumer QoS: global QoS on a quorum queue closes the connection.
        channel
            .basic_qos(settings.prefetch, BasicQosOptions { global: false })
            .await?;
        let mut deliveries = channel
            .basic_consume(
                topology.work_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.readiness.set_broker(true);
        self.metrics.amqp_connected.set(1);
        backoff.reset();
        tracing::info!(queue = %topology.work_queue, prefetch = settings.prefetch, "consuming");
        let settler = Settler::new(publisher, topology.clone());
        let in_flight = TaskTracker::new();
        let result = loop {
            // Wait for a slot first, so a delivery is only taken when it can start; both waits
            // race the shutdown.
            let permit = tokio::select! {
                () = cancel.cancelled() => break Ok(()),
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break Ok(()),
                },
            };
            tokio::select! {
                () = cancel.cancelled() => break Ok(()),
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let consumer = self.clone();
                        let settler = settler.clone();
                        in_flight.spawn(async move {
                            consumer.handle(delivery, &settler).await;
                            drop(permit);
                        });
                    }
                    Some(Err(error)) => break Err(error),
                    None => break Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                        lapin::ConnectionState::Closed,
                    ))),
                }
            }
        };
        in_flight.close();
        if cancel.is_cancelled() {
            self.stop(
                &channel,
                deliveries.tag().as_str(),
                &in_flight,
                settings,
                stop_batchers,
            )
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
        result
    }

    /// Steps (1) to (4) of the shutdown order in the module documentation.
    async fn stop(
        &self,
        channel: &Channel,
        consumer_tag: &str,
        in_flight: &TaskTracker,
        settings: &WorkerSettings,
        stop_batchers: &CancellationToken,
    ) {
        let started = tokio::time::Instant::now();
        if let Err(error) = channel
            .basic_cancel(consumer_tag.into(), BasicCancelOptions::default())
            .await
        {
            tracing::warn!(%error, "could not cancel the consumer; the connection close will");
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
        match tokio::time::timeout(
            STEP_TIMEOUT,
            settle_barrier(channel, &self.topology.work_queue),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "settle barrier failed; acks sent last may be redelivered")
            }
            Err(_) => tracing::warn!("settle barrier timed out; acks sent last may be redelivered"),
        }
    }

    /// Processes one delivery and settles it; the only caller of [`Settler::settle`].
    async fn handle(&self, delivery: Delivery, settler: &Settler) {
        let started = Instant::now();
        self.metrics.inflight.inc();
        let attempt = dead_letter::attempts(delivery.properties.headers().as_ref()) + 1;
        let span = tracing::info_span!(
            "message",
            event_id = tracing::field::Empty,
            tenant = tracing::field::Empty,
            booking_id = tracing::field::Empty,
            attempt
        );
        async {
            let processed = self.pipeline.process(&delivery.data).await;
            let span = tracing::Span::current();
            let info = processed.info;
            span.record("tenant", info.tenant.as_str());
            if let Some(id) = &info.event_id {
                span.record("event_id", id.as_str());
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
                    tracing::warn!(reason = %cause.reason, message = %redact(&cause.message), "booking not written");
                }
                Disposition::Written | Disposition::Superseded => {}
            }
            match settler.settle(&delivery, &info, disposition).await {
                Ok(settled) => {
                    self.count(&info.tenant, processed.type_label, settled);
                    self.metrics
                        .processing(&info.tenant)
                        .observe(started.elapsed().as_secs_f64());
                }
                Err(error) => tracing::error!(%error, "message not settled; the broker will redeliver it"),
            }
        }
        .instrument(span)
        .await;
        self.metrics.inflight.dec();
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

/// Returns once the work queue has taken in every ack sent on `channel` before it, so that a
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
/// How: `basic.get` on the work queue is a synchronous command through the same Raft log. It is
/// answered after everything the channel forwarded before it was applied, and the queue's
/// progress reports for those commands reach the channel before the answer, which makes the
/// channel forward the held acks before it handles anything we send after the answer (RabbitMQ 4
/// also forwards held acks before a `basic.cancel`, but ours is sent before the drain). A message
/// the get takes is handed straight back (`basic.reject` with requeue).
async fn settle_barrier(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    let taken = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?;
    if let Some(message) = taken {
        message
            .delivery
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await?;
    }
    Ok(())
}
