//! Reloads of the tenant files into the running [`Registry`]: one at a time, from the admin
//! API, SIGHUP, or the directory watcher.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::Registry;
use crate::config::TenantConfig;

/// Reloads the tenant directory into a registry.
#[derive(Clone)]
pub struct Reloader {
    registry: Arc<Registry>,
    dir: PathBuf,
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl Reloader {
    /// A reloader of `dir` into `registry`.
    pub fn new(registry: Arc<Registry>, dir: PathBuf) -> Self {
        Self {
            registry,
            dir,
            one_at_a_time: Arc::default(),
        }
    }

    /// Loads, compiles and checks every tenant file, and swaps them in — or keeps the running
    /// tenants and returns every problem.
    pub async fn reload(&self) -> Result<Vec<String>, Vec<String>> {
        let _one = self.one_at_a_time.lock().await;
        // A file that does not load is as much a rejected change as one its org refuses: both logged.
        let result = match TenantConfig::load_dir(&self.dir) {
            Ok(configs) => self.registry.replace(configs).await,
            Err(problems) => Err(problems),
        };
        match &result {
            Ok(names) => tracing::info!(tenants = ?names, "tenants reloaded"),
            Err(problems) => {
                for problem in problems {
                    tracing::error!(%problem, "tenant change rejected; the running mapping stays");
                }
            }
        }
        result
    }

    /// What the directory holds now: names, sizes and modification times of the tenant files.
    fn fingerprint(&self) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
            .map(|e| {
                let meta = e.metadata().ok();
                (
                    e.path(),
                    meta.as_ref().map_or(0, std::fs::Metadata::len),
                    meta.and_then(|m| m.modified().ok()),
                )
            })
            .collect();
        files.sort();
        files
    }

    /// Reloads whenever the tenant files change, until `cancel`; a reload in progress (it may
    /// wait on an org) is abandoned at `cancel`, leaving the running tenants as they were.
    pub async fn watch(self, every: Duration, cancel: CancellationToken) {
        let mut seen = self.fingerprint();
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = cancel.cancelled() => return,
            }
            let now = self.fingerprint();
            if now != seen {
                seen = now;
                // A rejected change is logged by `reload`; it is retried when the files change again.
                tokio::select! {
                    _ = self.reload() => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}
