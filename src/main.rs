//! The binary's edge: parse the command line, load config, start telemetry, run until a signal.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use portals_crm::amqp::Topology;
use portals_crm::cli::{Cli, Command, DlqAction, MappingAction};
use portals_crm::config::{Config, TenantConfig};
use portals_crm::dlq::{self, Dlq};
#[cfg(feature = "dev-tools")]
use portals_crm::emulator::{self, OrgSpec};
use portals_crm::service::Service;
use portals_crm::telemetry;
use portals_crm::tenants::{self, LoadedTenant};

/// jemalloc instead of glibc's allocator: the pipeline allocates many small, short-lived JSON
/// values per booking; with glibc, malloc/free took about half of the emulator's CPU (README,
/// Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A C string pointer jemalloc reads before `main`.
#[repr(transparent)]
pub struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points to a 'static, immutable C string literal.
unsafe impl Sync for MallocConf {}

/// jemalloc's options: one arena (tokio's few threads barely contend for it, and each extra
/// arena holds pages of its own) and freed pages handed back within a second, so the resident
/// set follows what is in flight. `_RJEM_MALLOC_CONF` in the environment overrides it.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: MallocConf =
    MallocConf(c"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A future that resolves on SIGTERM or SIGINT, whose handlers are registered by this call,
/// not when the future is first polled: until a handler is registered, the signal takes its
/// default action and ends the process on the spot, without the drain or the settle barrier.
///
/// # Errors
/// The handlers could not be registered.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run => {
            let config = Config::load(&cli.config)?;
            // Registered before the service starts consuming: a SIGTERM (or a SIGHUP) that came
            // before its handler would end the worker without its drain.
            let stopped = shutdown_signal()?;
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            let service = Service::start_from_dir(&config).await?;
            tracing::info!(http = %service.http_addr, "portals-crm running");
            let reloader = service.reloader.clone();
            let hangups = tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    // The outcome is logged by the reloader.
                    let _ = reloader.reload().await;
                }
            });
            stopped.await;
            hangups.abort();
            tracing::info!("shutting down");
            service.shutdown().await;
            Ok(())
        }
        #[cfg(feature = "dev-tools")]
        Command::Demo {
            events,
            keep_running,
            verbose,
            log_file,
        } => {
            let config = Config::load(&cli.config)?;
            let summary =
                portals_crm::demo::run(&config, events, keep_running, shutdown_signal()?).await?;
            println!("{summary}");
            if !verbose {
                println!("log:                 {}", log_file.display());
            }
            if summary.all_settled() {
                Ok(())
            } else {
                anyhow::bail!("not every event was settled")
            }
        }
        #[cfg(feature = "dev-tools")]
        Command::Bench {
            quick,
            scaling,
            fairness,
            cpu,
            latency_ms,
        } => {
            let config = Config::load(&cli.config)?;
            if scaling {
                let exe = std::env::current_exe().context("locating the portals-crm binary")?;
                let n = if quick { 3_000 } else { 30_000 };
                println!("| workers | bookings/s |\n|---|---|");
                for (workers, rate) in
                    portals_crm::bench::scaling(&config, &exe, n, latency_ms).await?
                {
                    println!("| {workers} | {rate:.0} |");
                }
                return Ok(());
            }
            let sizes = if quick {
                portals_crm::bench::BenchSizes {
                    bare: 5_000,
                    saturation: 3_000,
                    latency_secs: 3,
                    backlog: 10_000,
                    fair_fast: 500,
                    fair_slow: 2_000,
                }
            } else {
                portals_crm::bench::BenchSizes::default()
            };
            let exe = std::env::current_exe().context("locating the portals-crm binary")?;
            if cpu {
                println!(
                    "{}",
                    portals_crm::bench::cpu_only(&config, &exe, sizes).await?
                );
                return Ok(());
            }
            if fairness {
                let row = portals_crm::bench::fairness_only(&config, &exe, sizes).await?;
                println!("| measurement | value | target |\n|---|---|---|\n{row}");
                return Ok(());
            }
            let report = portals_crm::bench::run(&config, &exe, sizes).await?;
            println!("{report}");
            Ok(())
        }
        Command::Doctor { tenant } => {
            let config = Config::load(&cli.config)?;
            let (tenants, caches) = tenants_for_cli(&config, tenant.as_deref())?;
            let mut all_ok = true;
            for loaded in &tenants {
                let report =
                    portals_crm::doctor::check_tenant(&loaded.config, &loaded.client, &caches)
                        .await;
                println!("{report}");
                all_ok &= report.ok();
            }
            if all_ok {
                Ok(())
            } else {
                anyhow::bail!("doctor found things to fix")
            }
        }
        Command::Mapping { action } => {
            let config = Config::load(&cli.config)?;
            run_mapping(&config, action).await
        }
        Command::Dlq { action } => {
            let config = Config::load(&cli.config)?;
            let topology = Topology::new(&config.amqp, &config.retry_tiers());
            let dlq = Dlq::open(&config.amqp.url, topology).await?;
            let result = run_dlq(&dlq, action).await;
            dlq.close().await;
            result
        }
        #[cfg(feature = "dev-tools")]
        Command::Emulator {
            listen,
            org,
            tls,
            tls_dir,
            faults,
        } => {
            let org = match org {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    OrgSpec::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                }
                None => OrgSpec::demo(),
            };
            let handle = if tls {
                emulator::start_tls(listen, org, &faults.spec(), &tls_dir).await
            } else {
                emulator::start(listen, org, &faults.spec()).await
            }
            .with_context(|| format!("starting the emulator on {listen}"))?;
            println!("Salesforce emulator listening on {}", handle.base_url);
            if let Some(certificate) = &handle.certificate {
                println!(
                    "  certificate: {} (trust it: curl --cacert, or a tenant's org.ca_cert_file)",
                    certificate.display()
                );
            }
            println!(
                "  token:   POST {}/services/oauth2/token (demo-client / demo-secret)",
                handle.base_url
            );
            println!(
                "  records: GET  {}/__emulator/records/Lead",
                handle.base_url
            );
            shutdown_signal()?.await;
            handle.stop().await;
            Ok(())
        }
    }
}

/// Loads (and compiles) the selected tenants, with a cache of the process's own.
fn tenants_for_cli(
    config: &Config,
    only: Option<&str>,
) -> anyhow::Result<(Vec<LoadedTenant>, portals_crm::enrich::Caches)> {
    let mut tenants = TenantConfig::load_dir(&config.tenants.dir)
        .map_err(|p| anyhow::anyhow!("tenants:\n  - {}", p.join("\n  - ")))?;
    if let Some(only) = only {
        tenants.retain(|t| t.tenant == only);
        anyhow::ensure!(
            !tenants.is_empty(),
            "no tenant {only} in {}",
            config.tenants.dir.display()
        );
    }
    let metrics = std::sync::Arc::new(portals_crm::telemetry::metrics::Metrics::new());
    let timeout = std::time::Duration::from_secs(config.salesforce.timeout_secs);
    let loaded = tenants::load_tenants(tenants, timeout, &metrics)
        .map_err(|p| anyhow::anyhow!("tenants:\n  - {}", p.join("\n  - ")))?;
    Ok((loaded, portals_crm::enrich::Caches::temporary(metrics)?))
}

async fn run_mapping(config: &Config, action: MappingAction) -> anyhow::Result<()> {
    match action {
        MappingAction::Validate { tenant } => {
            let (tenants, caches) = tenants_for_cli(config, tenant.as_deref())?;
            let mut problems = 0;
            for loaded in &tenants {
                let name = &loaded.config.tenant;
                // Each tenant is checked whatever the one before met; its org's answer is its own.
                let found =
                    match tenants::check_against_org(&caches, &loaded.config, &loaded.client).await
                    {
                        Ok(found) => found,
                        Err(error) => {
                            println!("tenant {name}: not checked: {error}");
                            problems += 1;
                            continue;
                        }
                    };
                if found.is_empty() {
                    println!(
                        "tenant {}: mapping valid against the org",
                        loaded.config.tenant
                    );
                }
                for problem in &found {
                    println!("{problem}");
                }
                match tenants::org_setting_warnings(&caches, &loaded.config, &loaded.client).await {
                    Ok(warnings) => {
                        for warning in warnings {
                            println!("tenant {name}: warning: {warning}");
                        }
                    }
                    Err(error) => println!("tenant {name}: org settings not checked: {error}"),
                }
                problems += found.len();
            }
            anyhow::ensure!(
                problems == 0,
                "{problems} mapping problem{} (a tenant not checked counts as one)",
                if problems == 1 { "" } else { "s" }
            );
            Ok(())
        }
        MappingAction::Fields {
            tenant,
            sobject,
            json,
        } => {
            let (tenants, caches) = tenants_for_cli(config, Some(&tenant))?;
            let describe = caches
                .describe(&tenants[0].client, &sobject)
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!("the integration user of {tenant} cannot see {sobject}")
                })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&describe.fields)?);
            } else {
                println!("{}", portals_crm::plan::validate::fields_table(&describe));
            }
            Ok(())
        }
        MappingAction::Preview { tenant, event } => {
            let (tenants, caches) = tenants_for_cli(config, Some(&tenant))?;
            let loaded = &tenants[0];
            let body =
                std::fs::read(&event).with_context(|| format!("reading {}", event.display()))?;
            let mut decoded = portals_crm::event::decode(&body, config.worker.max_body_bytes)?;
            if decoded.tenant != tenant {
                // Previewed under --tenant, as the console's preview does; the worker would
                // write it for the tenant the event names.
                eprintln!(
                    "note: the event names tenant {:?}; previewed with {tenant:?}'s mapping (the service writes an event for the tenant it names)",
                    decoded.tenant
                );
                decoded.tenant = tenant.clone();
            }
            // As the console's preview: an org that cannot be reached (or a tenant not signed
            // in yet) still gets its graph, with placeholder user ids, said on stderr.
            let enrichment = match portals_crm::enrich::enrich(&decoded, &loaded.client, &caches)
                .await
            {
                Ok(enrichment) => enrichment,
                Err(error) => {
                    let sample = portals_crm::plan::samples::sample_enrichment();
                    eprintln!(
                        "note: the org's user ids could not be read ({error}); the preview uses no host user and the placeholder integration user {}",
                        sample.integration_user_id
                    );
                    sample
                }
            };
            let nodes = loaded.mapping.first_write_graph(&decoded, &enrichment)?;
            let request = portals_crm::salesforce::model::GraphRequest {
                graphs: vec![portals_crm::salesforce::model::Graph {
                    graph_id: "g0".into(),
                    composite_request: nodes,
                }],
            };
            // The planner writes bodies as JSON text: read into a tree, they are indented too.
            let request = serde_json::to_value(&request)?;
            println!("{}", serde_json::to_string_pretty(&request)?);
            Ok(())
        }
    }
}

async fn run_dlq(dlq: &Dlq, action: DlqAction) -> anyhow::Result<()> {
    let print = |letters: &[dlq::DeadLetter], matching: usize, json: bool| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(letters)?);
        } else {
            println!("{}", dlq::table(letters, matching));
        }
        Ok(())
    };
    match action {
        DlqAction::List { filter, json } => {
            let listing = dlq.listing(&filter.filter()).await?;
            if json && listing.matching > listing.letters.len() {
                eprintln!(
                    "{} shown",
                    dlq::counted(listing.letters.len(), listing.matching)
                );
            }
            print(&listing.letters, listing.matching, json)
        }
        DlqAction::Show { id } => {
            let filter = dlq::Filter {
                ids: vec![id.clone()],
                ..dlq::Filter::default()
            };
            let letters = dlq.list(&filter).await?;
            if letters.is_empty() {
                let shown = portals_crm::telemetry::logging::terminal_safe(&id).into_owned();
                return Err(dlq::DlqError::NotFound(shown).into());
            }
            // The same event dead-lettered twice (a duplicate publish, a replay that failed
            // again) is two letters with one id: each is shown, as a stream of JSON objects.
            if letters.len() > 1 {
                eprintln!(
                    "{} dead letters have id {}; each is shown",
                    letters.len(),
                    portals_crm::telemetry::logging::terminal_safe(&id)
                );
            }
            for letter in letters {
                println!("{}", serde_json::to_string_pretty(&letter)?);
            }
            Ok(())
        }
        DlqAction::Replay {
            filter,
            dry_run,
            json,
        } => {
            let replayed = dlq.replay(&filter.filter(), dry_run).await?;
            print(&replayed.letters, replayed.matching, json)?;
            eprintln!(
                "{} {}",
                if dry_run { "would replay" } else { "replayed" },
                dlq::counted(replayed.letters.len(), replayed.matching)
            );
            Ok(())
        }
        DlqAction::Purge { filter, yes } => {
            if !yes {
                anyhow::bail!(
                    "purging cannot be undone: add --yes (try `dlq list` with the same filters first)"
                );
            }
            let purged = dlq.purge(&filter.filter()).await?;
            eprintln!(
                "purged {}",
                dlq::counted(purged.letters.len(), purged.matching)
            );
            Ok(())
        }
        DlqAction::Export { file, filter } => {
            use std::io::Write as _;
            let listing = dlq.listing(&filter.filter()).await?;
            let letters = &listing.letters;
            let written = || -> std::io::Result<()> {
                let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
                for letter in letters {
                    serde_json::to_writer(&mut out, letter)?;
                    out.write_all(b"\n")?;
                }
                out.flush()
            };
            written().with_context(|| format!("writing {}", file.display()))?;
            eprintln!(
                "exported {} to {}",
                dlq::counted(letters.len(), listing.matching),
                file.display()
            );
            Ok(())
        }
    }
}

/// Where the demo writes its log instead of the terminal (none: the terminal).
#[cfg(feature = "dev-tools")]
fn demo_log_file(command: &Command) -> Option<std::path::PathBuf> {
    match command {
        Command::Demo {
            verbose: false,
            log_file,
            ..
        } => Some(log_file.clone()),
        _ => None,
    }
}

/// Without the dev tools there is no demo: every command logs to the terminal.
#[cfg(not(feature = "dev-tools"))]
fn demo_log_file(_: &Command) -> Option<std::path::PathBuf> {
    None
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = demo_log_file(&cli.command);
    // Held to the end: dropping it writes out the log lines still queued.
    let _log_guard = match telemetry::logging::init(cli.log_format, log_file.as_deref()) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("error: cannot open the log file: {error}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
