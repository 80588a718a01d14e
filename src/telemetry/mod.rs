//! Metrics, logging (with redaction) and the HTTP surface for /metrics and the probes.

pub mod admin;
pub mod http;
pub mod logging;
pub mod metrics;
