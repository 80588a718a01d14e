//! The AMQP consumer: connects (with backoff), declares the topology, consumes the work queue
//! with manual acks and per-consumer prefetch, hands each delivery to the [`Pipeline`], has
//! [`outcome::decide`] say its fate and the [`Settler`] carry it out, reconnects on loss, and
//! drains on shutdown. In-flight messages of a lost connection are simply redelivered: every
//! write is an idempotent upsert.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::amqp::{self, Publisher, Topology};
use crate::outcome::{self, Disposition, Settled, Settler, dead_letter};
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
}

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
    /// Consumes until `cancel`, reconnecting with backoff whenever the connection is lost.
    pub async fn run(self, settings: WorkerSettings, cancel: CancellationToken) {
        let mut backoff = Reconnect::new(Duration::from_millis(200), Duration::from_secs(30));
        let permits = Arc::new(Semaphore::new(settings.concurrency));
        let mut first = true;
        while !cancel.is_cancelled() {
            if !first {
                self.metrics.amqp_reconnects.inc();
            }
            first = false;
            let session = self
                .consume_once(&settings, &permits, &cancel, &mut backoff)
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
        if cancel.is_cancelled() {
            // Stop deliveries first so nothing new starts while the rest drains.
            let _ = channel
                .basic_cancel(deliveries.tag(), BasicCancelOptions::default())
                .await;
        }
        in_flight.close();
        if tokio::time::timeout(settings.drain, in_flight.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "drain deadline passed; unsettled messages go back to the queue with the connection"
            );
        }
        let _ = connection
            .close(200, "portals-crm shutting down".into())
            .await;
        result
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
            if let Disposition::Retry { cause, .. }
            | Disposition::Wait { cause, .. }
            | Disposition::DeadLetter(cause) = &disposition
            {
                tracing::warn!(reason = %cause.reason, message = %redact(&cause.message), "booking not written");
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
