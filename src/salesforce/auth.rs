//! OAuth 2.0 for the integration user: JWT bearer and client credentials, one cached token per
//! tenant.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::error::SalesforceError;
use super::model::{OAuthError, TokenResponse};
use crate::config::tenant::is_allowed_url;

/// How the integration user authenticates. Secrets are `SecretString`, so `Debug` redacts them.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// OAuth 2.0 JWT bearer flow: an assertion signed with the connected app's certificate key.
    JwtBearer {
        /// The connected app's consumer key (`iss`).
        consumer_key: String,
        /// The integration user's username (`sub`).
        username: String,
        /// PEM-encoded RSA private key.
        private_key: SecretString,
    },
    /// OAuth 2.0 client credentials flow (the app's run-as user).
    ClientCredentials {
        /// The connected app's consumer key.
        client_id: String,
        /// The connected app's consumer secret.
        client_secret: SecretString,
    },
}

/// A token in use, with what the identity URL says about it.
pub struct AccessToken {
    /// The bearer token.
    pub value: SecretString,
    /// Base URL of the org's REST API.
    pub instance_url: String,
    /// The integration user's Salesforce User Id (last segment of the identity URL).
    pub user_id: String,
    /// Bumps with every mint so a caller can tell whether its token was already replaced.
    pub generation: u64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &"[redacted]")
            .field("instance_url", &self.instance_url)
            .field("user_id", &self.user_id)
            .field("generation", &self.generation)
            .finish()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
}

/// Salesforce wants the assertion to expire "within 3 minutes".
const ASSERTION_LIFETIME: Duration = Duration::from_secs(170);

/// Builds the signed JWT bearer assertion.
pub fn jwt_assertion(
    consumer_key: &str,
    username: &str,
    audience: &str,
    private_key: &SecretString,
) -> Result<String, SalesforceError> {
    let key = EncodingKey::from_rsa_pem(private_key.expose_secret().as_bytes()).map_err(|_| {
        SalesforceError::Refused("the JWT private key is not an RSA PEM key".into())
    })?;
    let exp = (SystemTime::now() + ASSERTION_LIFETIME)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let claims = Claims {
        iss: consumer_key,
        sub: username,
        aud: audience,
        exp,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key)
        .map_err(|e| SalesforceError::Refused(format!("could not sign the JWT assertion: {e}")))
}

/// Runs the grant against `{login_url}/services/oauth2/token`.
pub async fn mint(
    http: &reqwest::Client,
    login_url: &str,
    credentials: &Credentials,
    generation: u64,
) -> Result<AccessToken, SalesforceError> {
    let endpoint = format!("{}/services/oauth2/token", login_url.trim_end_matches('/'));
    let form: Vec<(&str, String)> = match credentials {
        Credentials::JwtBearer {
            consumer_key,
            username,
            private_key,
        } => vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:jwt-bearer".to_owned(),
            ),
            (
                "assertion",
                jwt_assertion(consumer_key, username, login_url, private_key)?,
            ),
        ],
        Credentials::ClientCredentials {
            client_id,
            client_secret,
        } => vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", client_id.clone()),
            ("client_secret", client_secret.expose_secret().to_owned()),
        ],
    };
    let response =
        http.post(&endpoint)
            .form(&form)
            .send()
            .await
            .map_err(|e| SalesforceError::Transport {
                kind: "token",
                message: super::error::transport_message(e),
            })?;
    let status = response.status().as_u16();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| SalesforceError::Transport {
            kind: "token",
            message: super::error::transport_message(e),
        })?;
    if status != 200 {
        let body: OAuthError = serde_json::from_slice(&bytes).unwrap_or(OAuthError {
            error: super::signin::UNEXPECTED_RESPONSE.into(),
            error_description: format!("HTTP {status}"),
        });
        return Err(SalesforceError::Token {
            status,
            error: body.error,
            description: body.error_description,
        });
    }
    let token: TokenResponse =
        serde_json::from_slice(&bytes).map_err(|e| SalesforceError::Decode {
            kind: "token",
            message: e.to_string(),
        })?;
    let user_id = token
        .id
        .rsplit('/')
        .next()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| SalesforceError::Decode {
            kind: "token",
            message: "identity URL has no user id".into(),
        })?
        .to_owned();
    // Checked once, here, where the URL arrives: every request of the token's life goes to it
    // with the bearer token, and a refreshed token is checked like the first.
    if !is_allowed_url(&token.instance_url) {
        return Err(SalesforceError::Refused(format!(
            "instance URL {} must use https",
            token.instance_url
        )));
    }
    Ok(AccessToken {
        value: SecretString::from(token.access_token),
        instance_url: token.instance_url.trim_end_matches('/').to_owned(),
        user_id,
        generation,
    })
}

/// How long a failed mint is answered from memory: callers queued behind a failing token
/// endpoint get its error instead of each trying again (repeated failed logins can lock the
/// integration user out).
const FAILED_MINT_MEMORY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Slot {
    token: Option<Arc<AccessToken>>,
    failed: Option<(std::time::Instant, SalesforceError)>,
}

impl Slot {
    fn recent_failure(&self) -> Option<SalesforceError> {
        self.failed
            .as_ref()
            .filter(|(at, _)| at.elapsed() < FAILED_MINT_MEMORY)
            .map(|(_, error)| error.clone())
    }

    fn store(
        &mut self,
        result: Result<AccessToken, SalesforceError>,
    ) -> Result<Arc<AccessToken>, SalesforceError> {
        match result {
            Ok(token) => {
                let token = Arc::new(token);
                self.token = Some(token.clone());
                self.failed = None;
                Ok(token)
            }
            Err(error) => {
                // A failed refresh follows a 401: the token held is the one Salesforce refused.
                // Kept, every request would send it once more before learning of the failure.
                self.token = None;
                self.failed = Some((std::time::Instant::now(), error.clone()));
                Err(error)
            }
        }
    }
}

/// A token from the cache, and whether getting it went to the token endpoint (the only case
/// that counts as a request).
pub struct Fetched {
    /// The token, or why there is none.
    pub token: Result<Arc<AccessToken>, SalesforceError>,
    /// The token endpoint was called.
    pub minted: bool,
}

impl Fetched {
    fn cached(token: Result<Arc<AccessToken>, SalesforceError>) -> Self {
        Self {
            token,
            minted: false,
        }
    }
}

/// One token per tenant, shared by every concurrent request.
///
/// A tokio Mutex, because minting awaits the token endpoint while it is held: that is what
/// makes concurrent 401s cause one refresh instead of one per request.
#[derive(Debug, Default)]
pub struct TokenCache {
    current: tokio::sync::Mutex<Slot>,
}

impl TokenCache {
    /// The cached token, minting one when there is none.
    pub async fn get(
        &self,
        http: &reqwest::Client,
        login_url: &str,
        credentials: &Credentials,
    ) -> Fetched {
        let mut slot = self.current.lock().await;
        if let Some(token) = slot.token.as_ref() {
            return Fetched::cached(Ok(token.clone()));
        }
        if let Some(error) = slot.recent_failure() {
            return Fetched::cached(Err(error));
        }
        // Boxed: minting is rare, and its future would be part of every request's otherwise.
        let minted = Box::pin(mint(http, login_url, credentials, 1)).await;
        Fetched {
            token: slot.store(minted),
            minted: true,
        }
    }

    /// Replaces `stale` with a fresh token, unless another request already did.
    pub async fn refresh(
        &self,
        stale: &AccessToken,
        http: &reqwest::Client,
        login_url: &str,
        credentials: &Credentials,
    ) -> Fetched {
        let mut slot = self.current.lock().await;
        if let Some(token) = slot.token.as_ref()
            && token.generation != stale.generation
        {
            return Fetched::cached(Ok(token.clone()));
        }
        if let Some(error) = slot.recent_failure() {
            return Fetched::cached(Err(error));
        }
        let minted = Box::pin(mint(http, login_url, credentials, stale.generation + 1)).await;
        Fetched {
            token: slot.store(minted),
            minted: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_refresh_forgets_the_refused_token() {
        let mut slot = Slot::default();
        let token = AccessToken {
            value: SecretString::from("00D!refused"),
            instance_url: "https://acme.my.salesforce.com".into(),
            user_id: "005000000000001AAA".into(),
            generation: 1,
        };
        assert!(slot.store(Ok(token)).is_ok());
        let refused = SalesforceError::Token {
            status: 400,
            error: "invalid_grant".into(),
            description: "expired access/refresh token".into(),
        };
        assert!(slot.store(Err(refused)).is_err());
        assert!(
            slot.token.is_none(),
            "the refused token is not handed out again"
        );
        assert!(
            slot.recent_failure().is_some(),
            "callers get the failure meanwhile"
        );
    }

    #[test]
    fn credentials_debug_redacts_secrets() {
        let creds = Credentials::ClientCredentials {
            client_id: "demo-client".into(),
            client_secret: SecretString::from("top-secret-value"),
        };
        let jwt = Credentials::JwtBearer {
            consumer_key: "ck".into(),
            username: "u@example".into(),
            private_key: SecretString::from("-----BEGIN PRIVATE KEY-----secretkey"),
        };
        let printed = format!("{creds:?} {jwt:?}");
        assert!(!printed.contains("top-secret-value"), "{printed}");
        assert!(!printed.contains("secretkey"), "{printed}");
    }
}
