//! Metrics, logging (with redaction) and the HTTP surface for /metrics, probes and admin.

pub mod metrics;
