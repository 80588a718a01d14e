//! Prometheus metrics: one registry, the names, types and labels of DESIGN.md §9.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric portals-crm exports.
pub struct Metrics {
    registry: Registry,
    /// `portals_crm_events_received_total{tenant,type}`
    pub events_received: IntCounterVec,
    /// `portals_crm_events_settled_total{tenant,type,outcome}`
    pub events_settled: IntCounterVec,
    /// `portals_crm_event_processing_seconds{tenant}`
    pub processing_seconds: HistogramVec,
    /// `portals_crm_event_lag_seconds{tenant}`
    pub lag_seconds: HistogramVec,
    /// `portals_crm_salesforce_requests_total{tenant,kind,status}`
    pub sf_requests: IntCounterVec,
    /// `portals_crm_salesforce_request_seconds{tenant,kind}`
    pub sf_request_seconds: HistogramVec,
    /// `portals_crm_salesforce_graphs_per_request{tenant}`
    pub graphs_per_request: HistogramVec,
    /// `portals_crm_salesforce_api_usage_ratio{tenant}`
    pub api_usage_ratio: prometheus::GaugeVec,
    /// `portals_crm_retries_total{tenant,tier}`
    pub retries: IntCounterVec,
    /// `portals_crm_dead_letters_total{tenant,reason}`
    pub dead_letters: IntCounterVec,
    /// `portals_crm_tenant_busy_total{tenant}`: messages parked in the first retry tier
    /// because their tenant had its limit of messages in flight (one extra publish each).
    pub tenant_busy: IntCounterVec,
    /// `portals_crm_refused_values_total{tenant,sobject,field,treatment}`: field values the org
    /// refused that a booking wrote anyway, `treatment` `punycoded` (the domain, IDNA) or
    /// `dropped` (the record written without the field, as the mapping's `invalid_value` says).
    pub refused_values: IntCounterVec,
    /// `portals_crm_duplicates_related_total{tenant,sobject}`: records of a mapping a duplicate
    /// rule matched to an existing record, written as that record (`sobject`, `Lead` or
    /// `Contact`) under `duplicate_rule = "relate_to_existing"`: bookings attached to records
    /// the org already had.
    pub duplicates_related: IntCounterVec,
    /// `portals_crm_circuit_open{tenant}`
    pub circuit_open: IntGaugeVec,
    /// `portals_crm_tenant_file_rejected{tenant}`
    pub tenant_file_rejected: IntGaugeVec,
    /// `portals_crm_salesforce_auth_refused{tenant,reason}`: 1 while the org refuses the
    /// tenant's sign-in, `reason` = `salesforce_auth_<OAuth error>`.
    pub salesforce_auth_refused: IntGaugeVec,
    /// `portals_crm_salesforce_api_version_not_offered{tenant}`: 1 while the tenant's org does
    /// not offer the REST API version of its file (`org.api_version`): its bookings wait in the
    /// retry tiers, unattempted, until the file is fixed.
    pub salesforce_api_version_not_offered: IntGaugeVec,
    /// `portals_crm_tenant_queue_refused{tenant}`: 1 while the broker refuses this worker the
    /// tenant's queue (a permission, or a queue that exists with other arguments): the tenant's
    /// events use the shared queue; 0 while it is consumed. Reset when a connection ends: the
    /// next one declares every queue again.
    pub tenant_queue_refused: IntGaugeVec,
    /// `portals_crm_inflight_events`
    pub inflight: IntGauge,
    /// `portals_crm_cache_requests_total{cache,result}`
    pub cache_requests: IntCounterVec,
    /// `portals_crm_amqp_connected`
    pub amqp_connected: IntGauge,
    /// `portals_crm_amqp_reconnects_total`
    pub amqp_reconnects: IntCounter,
    /// `portals_crm_amqp_acks_total{sent}`: deliveries acknowledged, `in_run` (covered by a
    /// multiple ack) or `alone` (held behind an unsettled delivery, then acked on its own; a
    /// rising share means messages settle far out of order, or one is stuck, see
    /// [`crate::amqp::acks`]).
    pub amqp_acks: IntCounterVec,
    /// `portals_crm_event_unknown_fields_total{field}`
    pub unknown_fields: crate::event::unknown_fields::UnknownFields,
}

/// Latency buckets from 5 ms to 5 min: a booking normally settles in well under a second, but
/// retries through the tiers stretch lag to minutes.
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let events_received = counter(
            "portals_crm_events_received_total",
            "Booking events received from the work queue.",
            &["tenant", "type"],
        );
        let events_settled = counter(
            "portals_crm_events_settled_total",
            "Booking events settled, by outcome.",
            &["tenant", "type", "outcome"],
        );
        let processing_seconds = histogram(
            "portals_crm_event_processing_seconds",
            "Time from delivery to settle.",
            &["tenant"],
            SECONDS_BUCKETS,
        );
        let lag_seconds = histogram(
            "portals_crm_event_lag_seconds",
            "Time from the event's time to the Salesforce commit.",
            &["tenant"],
            SECONDS_BUCKETS,
        );
        let sf_requests = counter(
            "portals_crm_salesforce_requests_total",
            "Requests sent to Salesforce.",
            &["tenant", "kind", "status"],
        );
        let sf_request_seconds = histogram(
            "portals_crm_salesforce_request_seconds",
            "Salesforce request latency.",
            &["tenant", "kind"],
            SECONDS_BUCKETS,
        );
        let graphs_per_request = histogram(
            "portals_crm_salesforce_graphs_per_request",
            "Graphs carried by one Composite Graph request.",
            &["tenant"],
            &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 75.0],
        );
        let api_usage_ratio = prometheus::GaugeVec::new(
            Opts::new(
                "portals_crm_salesforce_api_usage_ratio",
                "Used / max daily API requests, from Sforce-Limit-Info.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(api_usage_ratio.clone()))
            .expect("unique metric");
        let retries = counter(
            "portals_crm_retries_total",
            "Events scheduled for a retry, by tier.",
            &["tenant", "tier"],
        );
        let dead_letters = counter(
            "portals_crm_dead_letters_total",
            "Events dead-lettered, by reason.",
            &["tenant", "reason"],
        );
        let amqp_acks = counter(
            "portals_crm_amqp_acks_total",
            "Deliveries acknowledged: in_run (one multiple ack for a run of them) or alone (held \
             behind an unsettled delivery, then acked on its own).",
            &["sent"],
        );
        let tenant_busy = counter(
            "portals_crm_tenant_busy_total",
            "Events parked in the first retry tier, attempt not counted, because their tenant \
             had its limit of events in flight (each costs one extra broker publish).",
            &["tenant"],
        );
        let refused_values = counter(
            "portals_crm_refused_values_total",
            "Field values the org refused, written punycoded or dropped, by field.",
            &["tenant", "sobject", "field", "treatment"],
        );
        let duplicates_related = counter(
            "portals_crm_duplicates_related_total",
            "Records a duplicate rule matched, written as the existing record, by its sObject.",
            &["tenant", "sobject"],
        );
        let circuit_open = IntGaugeVec::new(
            Opts::new(
                "portals_crm_circuit_open",
                "1 while a tenant is paused by its circuit breaker.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(circuit_open.clone()))
            .expect("unique metric");
        let tenant_file_rejected = IntGaugeVec::new(
            Opts::new(
                "portals_crm_tenant_file_rejected",
                "1 while a tenant runs on its last good file from the cache because its file was rejected at start-up.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(tenant_file_rejected.clone()))
            .expect("unique metric");
        let salesforce_auth_refused = IntGaugeVec::new(
            Opts::new(
                "portals_crm_salesforce_auth_refused",
                "1 while Salesforce refuses the tenant's sign-in (the tenant is paused), by reason.",
            ),
            &["tenant", "reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(salesforce_auth_refused.clone()))
            .expect("unique metric");
        let salesforce_api_version_not_offered = IntGaugeVec::new(
            Opts::new(
                "portals_crm_salesforce_api_version_not_offered",
                "1 while the tenant's org does not offer the REST API version of its file (org.api_version): its bookings wait until the file is fixed.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(salesforce_api_version_not_offered.clone()))
            .expect("unique metric");
        let tenant_queue_refused = IntGaugeVec::new(
            Opts::new(
                "portals_crm_tenant_queue_refused",
                "1 while the broker refuses this worker the tenant's queue (a permission, or a queue that exists with other arguments): the tenant's events use the shared queue.",
            ),
            &["tenant"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(tenant_queue_refused.clone()))
            .expect("unique metric");
        let inflight = IntGauge::new(
            "portals_crm_inflight_events",
            "Events received and not yet settled.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(inflight.clone()))
            .expect("unique metric");
        let cache_requests = counter(
            "portals_crm_cache_requests_total",
            "Cache look-ups, by cache and result.",
            &["cache", "result"],
        );
        let amqp_connected = IntGauge::new(
            "portals_crm_amqp_connected",
            "1 while connected to the broker.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(amqp_connected.clone()))
            .expect("unique metric");
        let amqp_reconnects =
            IntCounter::new("portals_crm_amqp_reconnects_total", "Broker reconnections.")
                .expect("valid metric");
        registry
            .register(Box::new(amqp_reconnects.clone()))
            .expect("unique metric");
        let unknown_fields = crate::event::unknown_fields::UnknownFields::register(&registry)
            .expect("unique metric");
        Self {
            registry,
            events_received,
            events_settled,
            processing_seconds,
            lag_seconds,
            sf_requests,
            sf_request_seconds,
            graphs_per_request,
            api_usage_ratio,
            retries,
            dead_letters,
            tenant_busy,
            amqp_acks,
            refused_values,
            duplicates_related,
            circuit_open,
            tenant_file_rejected,
            salesforce_auth_refused,
            salesforce_api_version_not_offered,
            tenant_queue_refused,
            inflight,
            cache_requests,
            amqp_connected,
            amqp_reconnects,
            unknown_fields,
        }
    }

    /// Records one Salesforce request.
    pub fn salesforce_request(&self, tenant: &str, kind: &str, status: &str, seconds: f64) {
        self.sf_requests
            .with_label_values(&[tenant, kind, status])
            .inc();
        self.sf_request_seconds
            .with_label_values(&[tenant, kind])
            .observe(seconds);
    }

    /// Records a cache look-up.
    pub fn cache(&self, cache: &str, hit: bool) {
        self.cache_requests
            .with_label_values(&[cache, if hit { "hit" } else { "miss" }])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if encoder
            .encode(&self.registry.gather(), &mut buffer)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// `(tenant, reason)` of every tenant whose sign-in Salesforce refuses now, sorted.
    pub fn sign_in_refused(&self) -> Vec<(String, String)> {
        use prometheus::core::Collector;
        let mut refused = Vec::new();
        for family in self.salesforce_auth_refused.collect() {
            for metric in family.get_metric() {
                if metric.get_gauge().get_value() < 1.0 {
                    continue;
                }
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                refused.push((label("tenant"), label("reason")));
            }
        }
        refused.sort();
        refused
    }

    /// Settled events summed by `outcome` (the demo's progress and summary).
    pub fn settled_by_outcome(&self) -> std::collections::BTreeMap<String, u64> {
        sum_by_label(&self.events_settled, "outcome")
    }

    /// Dead letters summed by `reason`.
    pub fn dead_letters_by_reason(&self) -> std::collections::BTreeMap<String, u64> {
        sum_by_label(&self.dead_letters, "reason")
    }

    /// A histogram of one label set, for callers that time a block.
    pub fn processing(&self, tenant: &str) -> Histogram {
        self.processing_seconds.with_label_values(&[tenant])
    }
}

fn sum_by_label(counters: &IntCounterVec, label: &str) -> std::collections::BTreeMap<String, u64> {
    use prometheus::core::Collector;
    let mut out = std::collections::BTreeMap::new();
    for family in counters.collect() {
        for metric in family.get_metric() {
            let key = metric
                .get_label()
                .iter()
                .find(|l| l.name() == label)
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            *out.entry(key).or_default() += metric.get_counter().get_value() as u64;
        }
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
