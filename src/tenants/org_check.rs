//! Every tenant's mapping checked against its org as the integration user sees it (describes
//! from the cache, revalidated with If-Modified-Since): at start, on every reload, and
//! periodically, so a permission revoked in the org shows up in the log before writes fail.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Registry;
use crate::config::TenantConfig;
use crate::enrich::Caches;
use crate::plan::validate::{MappingProblem, validate};
use crate::salesforce::{SalesforceClient, SalesforceError};

/// Problems of `config`'s mapping against its org, as the integration user sees it. `Err` when
/// the org could not be asked (the mapping is then neither accepted nor refused).
pub async fn check_against_org(
    caches: &Caches,
    config: &TenantConfig,
    client: &SalesforceClient,
) -> Result<Vec<MappingProblem>, SalesforceError> {
    let mut describes = HashMap::new();
    for record in &config.records {
        if let Some(describe) = caches.describe(client, &record.sobject).await? {
            describes.insert(record.sobject.clone(), describe);
        }
    }
    Ok(validate(config, &describes))
}

/// What `config`'s data can meet in org settings the API does not report
/// ([`crate::plan::org_settings`]), from the cached describes.
pub async fn org_setting_warnings(
    caches: &Caches,
    config: &TenantConfig,
    client: &SalesforceClient,
) -> Result<Vec<crate::plan::org_settings::OrgSettingWarning>, SalesforceError> {
    let mut describes = HashMap::new();
    for record in &config.records {
        if let Some(describe) = caches.describe(client, &record.sobject).await? {
            describes.insert(record.sobject.clone(), describe);
        }
    }
    Ok(crate::plan::org_settings::warnings(config, &describes))
}

/// Checks every tenant at start and then every `every` (none: once), until `cancel`. A start
/// never waits for (or fails on) an org, and a slow org never holds up a shutdown: each check
/// is raced against `cancel`.
pub async fn watch_orgs(
    registry: Arc<Registry>,
    every: Option<Duration>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = check_all(&registry) => {}
            () = cancel.cancelled() => return,
        }
        let Some(every) = every else { return };
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = cancel.cancelled() => return,
        }
    }
}

async fn check_all(registry: &Registry) {
    for tenant in registry.all() {
        match check_against_org(registry.caches(), &tenant.config, &tenant.client).await {
            Ok(problems) if problems.is_empty() => {
                tracing::info!(tenant = %tenant.config.tenant, "mapping valid against the org");
            }
            Ok(problems) => {
                for problem in problems {
                    tracing::error!(%problem, "mapping problem: writes will be dead-lettered until it is fixed");
                }
            }
            Err(error) => match error.sign_in_refused() {
                // Paused now rather than at its first booking, which would meet the same refusal.
                Some(refused) => tenant.breaker.refuse_sign_in(&refused),
                None => {
                    tracing::warn!(tenant = %tenant.config.tenant, %error, "mapping not checked: org unreachable")
                }
            },
        }
    }
}
