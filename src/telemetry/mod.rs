//! Metrics, logging (with redaction) and the HTTP surface for /metrics and the probes. It
//! observes the pipeline and depends on none of it.

pub mod http;
pub mod json_lines;
pub mod logging;
pub mod metrics;
