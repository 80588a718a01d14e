//! The command line: `run`, `doctor`, `mapping`, `dlq`; with the `dev-tools` feature also
//! `demo`, `bench` and `emulator`.

#[cfg(feature = "dev-tools")]
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[cfg(feature = "dev-tools")]
use crate::emulator::FaultSpec;
use crate::telemetry::logging::LogFormat;

/// portals-crm: BookMe bookings → Salesforce, idempotently.
#[derive(Debug, Parser)]
#[command(name = "portals-crm", version, about)]
pub struct Cli {
    /// Service configuration file.
    #[arg(long, global = true, default_value = "config/portals-crm.toml")]
    pub config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: consume booking events and write them to Salesforce.
    Run,
    #[cfg(feature = "dev-tools")]
    /// Start the emulator in-process, publish sample bookings through the local broker,
    /// process them, print a summary.
    Demo {
        /// How many events to publish.
        #[arg(long, default_value_t = 300)]
        events: usize,
        /// Leave the service and emulator running afterwards (Ctrl-C stops them).
        #[arg(long)]
        keep_running: bool,
        /// Log to the terminal; without it the log goes to --log-file and the terminal shows
        /// progress and the summary.
        #[arg(long)]
        verbose: bool,
        /// Where the log goes without --verbose.
        #[arg(long, default_value = "data/demo.log")]
        log_file: PathBuf,
    },
    #[cfg(feature = "dev-tools")]
    /// The end-to-end load bench (build with --release): prints a table and writes
    /// target/bench/pipeline.json.
    Bench {
        /// Small sizes, for a smoke run.
        #[arg(long)]
        quick: bool,
        /// Instead: throughput with 1, 2 and 3 workers on one queue.
        #[arg(long)]
        scaling: bool,
        /// Instead: only the fairness row (one tenant's bookings alone, then behind a slow
        /// neighbour's backlog).
        #[arg(long)]
        fairness: bool,
        /// Instead: only the CPU figures (the bare consumer and one zero-latency run).
        #[arg(long)]
        cpu: bool,
        /// With --scaling: the emulator's latency per request.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Check tenants end to end before go-live: sign-in, API access, permissions of the mapping,
    /// external ids, the version guard, quota headroom. Exits non-zero on any miss.
    Doctor {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Validate mappings, list fields, preview the graph of an event.
    Mapping {
        /// What to do.
        #[command(subcommand)]
        action: MappingAction,
    },
    /// Inspect, replay, purge or export dead letters.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        action: DlqAction,
    },
    #[cfg(feature = "dev-tools")]
    /// Serve the Salesforce emulator.
    Emulator {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:7800")]
        listen: SocketAddr,
        /// Org file (TOML or JSON); the built-in demo org when absent.
        #[arg(long)]
        org: Option<PathBuf>,
        /// Serve https with a self-signed certificate, written into --tls-dir.
        #[arg(long)]
        tls: bool,
        /// Where --tls writes emulator-cert.pem and emulator-key.pem.
        #[arg(long, default_value = "target/emulator-tls")]
        tls_dir: PathBuf,
        /// Faults to start with.
        #[command(flatten)]
        faults: FaultArgs,
    },
}

/// `mapping` subcommands.
#[derive(Debug, Subcommand)]
pub enum MappingAction {
    /// Validate mappings against each sObject's describe as the integration user sees it.
    Validate {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The fields of an sObject the integration user may use (what the Management UI offers).
    Fields {
        /// Tenant whose org and integration user to ask.
        #[arg(long)]
        tenant: String,
        /// The sObject.
        #[arg(long)]
        sobject: String,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The Composite Graph an event would become (nothing is written).
    Preview {
        /// Tenant whose mapping to use.
        #[arg(long)]
        tenant: String,
        /// A CloudEvents JSON file.
        #[arg(long)]
        event: PathBuf,
    },
}

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters (non-destructive).
    List {
        /// Which ones.
        #[command(flatten)]
        filter: FilterArgs,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter whole: headers and body.
    Show {
        /// Its id (first column of `dlq list`).
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: String,
    },
    /// Publish dead letters back to the work queue (attempts reset); each is removed only after
    /// the broker confirmed its copy.
    Replay {
        /// Which ones.
        #[command(flatten)]
        filter: FilterArgs,
        /// Only show what would be replayed.
        #[arg(long)]
        dry_run: bool,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters.
    Purge {
        /// Which ones.
        #[command(flatten)]
        filter: FilterArgs,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Write dead letters to a file as JSON lines (non-destructive).
    Export {
        /// Output file.
        file: PathBuf,
        /// Which ones.
        #[command(flatten)]
        filter: FilterArgs,
    },
}

/// Filters shared by the `dlq` subcommands.
#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// Only this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only this reason code (e.g. salesforce_invalid_field; README lists them all).
    #[arg(long, value_parser = reason_code)]
    pub reason: Option<String>,
    /// Only these ids (repeatable).
    #[arg(long = "id", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub ids: Vec<String>,
    /// At most this many.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl FilterArgs {
    /// The equivalent filter.
    pub fn filter(&self) -> crate::dlq::Filter {
        crate::dlq::Filter {
            tenant: self.tenant.clone(),
            reason: self.reason.clone(),
            ids: self.ids.clone(),
            limit: self.limit,
            require_ids: true,
        }
    }
}

/// `--reason`: one of the reason codes a dead letter can carry
/// ([`crate::outcome::Reason::check_label`]), so that a typo is an error instead of an empty
/// list (or a purge of nothing).
fn reason_code(value: &str) -> Result<String, String> {
    crate::outcome::Reason::check_label(value).map(|()| value.to_owned())
}

#[cfg(feature = "dev-tools")]
/// Fault flags of `portals-crm emulator` (the same keys as `POST /__emulator/faults`).
#[derive(Debug, clap::Args)]
pub struct FaultArgs {
    /// Fixed latency added to every data request.
    #[arg(long)]
    pub latency_ms: Option<u64>,
    /// Random extra latency up to this many milliseconds.
    #[arg(long)]
    pub jitter_ms: Option<u64>,
    /// Fraction of data requests that fail (0–1).
    #[arg(long)]
    pub error_rate: Option<f64>,
    /// Failures to draw from: 503, 500, UNABLE_TO_LOCK_ROW.
    #[arg(long, value_delimiter = ',')]
    pub errors: Option<Vec<String>>,
    /// Remaining daily API requests.
    #[arg(long)]
    pub api_quota_remaining: Option<u64>,
    /// Answer 503 to everything for this many seconds after start.
    #[arg(long)]
    pub outage_seconds: Option<u64>,
}

#[cfg(feature = "dev-tools")]
impl FaultArgs {
    /// The equivalent fault spec.
    pub fn spec(&self) -> FaultSpec {
        FaultSpec {
            latency_ms: self.latency_ms,
            jitter_ms: self.jitter_ms,
            error_rate: self.error_rate,
            errors: self.errors.clone(),
            expire_tokens: None,
            api_quota_remaining: self.api_quota_remaining,
            outage_seconds: self.outage_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_takes_only_a_reason_code_and_names_the_close_ones() {
        assert_eq!(
            reason_code("salesforce_invalid_field").as_deref(),
            Ok("salesforce_invalid_field")
        );
        assert_eq!(
            reason_code("delivery_limit").as_deref(),
            Ok("delivery_limit")
        );
        let typo = reason_code("salesforce_invalid_feild").unwrap_err();
        assert!(
            typo.starts_with("not a reason code (did you mean salesforce_invalid_field?)"),
            "{typo}"
        );
        let unknown = reason_code("bogus").unwrap_err();
        assert!(unknown.starts_with("not a reason code; "), "{unknown}");
        let code = reason_code("INVALID_FIELD").unwrap_err();
        assert!(
            code.contains("did you mean salesforce_invalid_field"),
            "{code}"
        );
        let part = reason_code("rejected").unwrap_err();
        assert!(part.contains("did you mean broker_rejected?"), "{part}");
        let other = reason_code("salesforce_invalid_operation").unwrap_err();
        assert!(other.contains("salesforce_other"), "{other}");
    }
}
