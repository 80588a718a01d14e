//! Every tenant's mapping checked against its org as the integration user sees it (describes
//! from the cache, revalidated with If-Modified-Since): at start, on every reload, and
//! periodically, so a permission revoked in the org shows up in the log before writes fail.
//! Each tenant's last result is kept ([`OrgChecks`]) for the console's tenants overview, which
//! shows it instead of asking every org on every page load, and asks again only on demand
//! ([`recheck`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Registry, Tenant};
use crate::config::TenantConfig;
use crate::enrich::Caches;
use crate::plan::validate::{MappingProblem, validate};
use crate::salesforce::model::SObjectDescribe;
use crate::salesforce::{SalesforceClient, SalesforceError};

/// Problems of `config`'s mapping against its org, as the integration user sees it. `Err` when
/// the org could not be asked (the mapping is then neither accepted nor refused).
pub async fn check_against_org(
    caches: &Caches,
    config: &TenantConfig,
    client: &SalesforceClient,
) -> Result<Vec<MappingProblem>, SalesforceError> {
    Ok(validate(config, &describes(caches, config, client).await?))
}

/// What `config`'s data can meet in org settings the API does not report
/// ([`crate::plan::org_settings`]), from the cached describes.
pub async fn org_setting_warnings(
    caches: &Caches,
    config: &TenantConfig,
    client: &SalesforceClient,
) -> Result<Vec<crate::plan::org_settings::OrgSettingWarning>, SalesforceError> {
    Ok(crate::plan::org_settings::warnings(
        config,
        &describes(caches, config, client).await?,
    ))
}

/// The cached describes of the sObjects `config`'s mapping is checked against
/// ([`TenantConfig::described_sobjects`]); an object the integration user cannot see is absent.
async fn describes(
    caches: &Caches,
    config: &TenantConfig,
    client: &SalesforceClient,
) -> Result<HashMap<String, SObjectDescribe>, SalesforceError> {
    let mut describes = HashMap::new();
    for sobject in config.described_sobjects() {
        if let Some(describe) = caches.describe(client, sobject).await? {
            describes.insert(sobject.to_owned(), describe);
        }
    }
    Ok(describes)
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

/// The last check of one tenant's mapping against its org.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastCheck {
    /// When it ran (UTC, RFC 3339).
    pub at: String,
    /// The problems found (none: valid against the org).
    pub problems: Vec<MappingProblem>,
    /// Why the org could not be asked; `problems` is then empty.
    pub org_error: Option<String>,
}

impl LastCheck {
    fn of(result: &Result<Vec<MappingProblem>, SalesforceError>) -> Self {
        let (problems, org_error) = match result {
            Ok(found) => (found.clone(), None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        Self {
            at: crate::event::timestamp::canonical(time::OffsetDateTime::now_utc()),
            problems,
            org_error,
        }
    }
}

/// Each tenant's last check against its org, by tenant id.
#[derive(Debug, Default)]
pub struct OrgChecks {
    /// A std Mutex: held only to read or replace an entry, never across an await.
    last: Mutex<HashMap<String, LastCheck>>,
}

impl OrgChecks {
    /// The last check of `tenant`, if one ran since the start.
    pub fn get(&self, tenant: &str) -> Option<LastCheck> {
        self.lock().get(tenant).cloned()
    }

    /// Records `result` as the last check of `tenant`.
    pub fn record(
        &self,
        tenant: &str,
        result: &Result<Vec<MappingProblem>, SalesforceError>,
    ) -> LastCheck {
        let check = LastCheck::of(result);
        self.lock().insert(tenant.to_owned(), check.clone());
        check
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LastCheck>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Checks `tenant`'s mapping against its org now, keeps the result as its last check, and
/// pauses the tenant when the org refuses the sign-in (as the periodic check does).
pub async fn recheck(registry: &Registry, tenant: &Tenant) -> LastCheck {
    let result = check_against_org(registry.caches(), &tenant.config, &tenant.client).await;
    if let Some(refused) = result
        .as_ref()
        .err()
        .and_then(SalesforceError::sign_in_refused)
    {
        tenant.breaker.refuse_sign_in(&refused);
    }
    registry.org_checks().record(&tenant.config.tenant, &result)
}

async fn check_all(registry: &Registry) {
    for tenant in registry.all() {
        let result = check_against_org(registry.caches(), &tenant.config, &tenant.client).await;
        registry.org_checks().record(&tenant.config.tenant, &result);
        match result {
            Ok(problems) if problems.is_empty() => {
                tracing::info!(tenant = %tenant.config.tenant, "mapping valid against the org");
            }
            Ok(problems) => {
                for problem in problems {
                    tracing::error!(%problem, "mapping problem: writes will be dead-lettered until it is fixed");
                }
            }
            Err(error @ SalesforceError::VersionNotOffered { .. }) => {
                tracing::error!(tenant = %tenant.config.tenant, %error, "mapping not checked: the tenant's bookings wait (salesforce_api_version_not_offered) until org.api_version is fixed");
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
