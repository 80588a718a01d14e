//! Where and how to reach a tenant's org: its tenant file's org and credential references,
//! resolved into an [`OrgEndpoint`]. The secrets are read here, at the edge of the Salesforce
//! client, so the configuration holds references only.

use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;

use super::auth::Credentials;
use super::client::OrgEndpoint;
use crate::config::{AuthConfig, TenantConfig};

/// A secret from exactly one of a file (trimmed) or an environment variable; `what` names
/// the setting in the error, which never holds the secret.
fn read_secret(file: Option<&Path>, env: Option<&str>, what: &str) -> Result<SecretString, String> {
    match (file, env) {
        (Some(path), None) => std::fs::read_to_string(path)
            .map(|s| SecretString::from(s.trim().to_owned()))
            .map_err(|e| format!("{what}: cannot read {}: {e}", path.display())),
        (None, Some(name)) => std::env::var(name)
            .map(SecretString::from)
            .map_err(|error| match error {
                std::env::VarError::NotPresent => {
                    format!("{what}: environment variable {name} is not set")
                }
                // Its value is the secret: named, never shown.
                std::env::VarError::NotUnicode(_) => {
                    format!("{what}: environment variable {name} is not UTF-8")
                }
            }),
        _ => Err(format!(
            "{what}: give exactly one of a _file or an _env reference"
        )),
    }
}

/// Resolves `tenant`'s credential references into secrets.
pub fn credentials(tenant: &TenantConfig) -> Result<Credentials, String> {
    let what = format!("tenant {}: auth", tenant.tenant);
    Ok(match &tenant.auth {
        AuthConfig::JwtBearer {
            consumer_key,
            username,
            private_key_file,
            private_key_env,
        } => Credentials::JwtBearer {
            consumer_key: consumer_key.clone(),
            username: username.clone(),
            private_key: read_secret(
                private_key_file.as_deref(),
                private_key_env.as_deref(),
                &what,
            )?,
        },
        AuthConfig::ClientCredentials {
            client_id,
            client_secret_file,
            client_secret_env,
        } => Credentials::ClientCredentials {
            client_id: client_id.clone(),
            client_secret: read_secret(
                client_secret_file.as_deref(),
                client_secret_env.as_deref(),
                &what,
            )?,
        },
    })
}

impl OrgEndpoint {
    /// The endpoint of `tenant`'s org, with its secrets read; requests time out after `timeout`.
    pub fn for_tenant(tenant: &TenantConfig, timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            tenant: tenant.tenant.clone(),
            login_url: tenant.org.login_url.trim_end_matches('/').to_owned(),
            api_version: tenant.org.api_version.clone(),
            credentials: credentials(tenant)?,
            timeout,
            duplicate_rule: tenant.org.duplicate_rule,
            ca_certificate: tenant
                .org
                .ca_cert_file
                .as_ref()
                .map(|path| {
                    std::fs::read(path).map_err(|e| {
                        format!(
                            "tenant {}: ca_cert_file {}: {e}",
                            tenant.tenant,
                            path.display()
                        )
                    })
                })
                .transpose()?,
        })
    }
}
