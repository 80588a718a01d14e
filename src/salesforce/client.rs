//! The Salesforce REST client of one tenant's org.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode, header};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::auth::{AccessToken, Credentials, TokenCache};
use super::error::SalesforceError;
use super::model::{
    ApiError, CompositeRequest, CompositeResponse, DescribeGlobal, GraphRequest, GraphResponse,
    Limit, MAX_COMPOSITE_SUBREQUESTS, MAX_GRAPHS_PER_REQUEST, MAX_NODES_PER_REQUEST, QueryPage,
    SObjectDescribe, SaveResult, UpsertOutcome,
};
use crate::config::DuplicateRulePolicy;
use crate::config::tenant::is_allowed_url;
use crate::telemetry::metrics::Metrics;

/// Used/max daily API requests, from the `Sforce-Limit-Info` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiUsage {
    /// Requests used in the rolling 24 h.
    pub used: u64,
    /// The org's allocation.
    pub max: u64,
}

impl ApiUsage {
    /// Parses `api-usage=18/5000` out of a `Sforce-Limit-Info` value.
    pub fn parse(header: &str) -> Option<Self> {
        let usage = header
            .split(',')
            .map(str::trim)
            .find_map(|part| part.strip_prefix("api-usage="))?;
        let (used, max) = usage.split_once('/')?;
        Some(Self {
            used: used.trim().parse().ok()?,
            max: max.trim().parse().ok()?,
        })
    }

    /// used / max, 1.0 when the org has no allocation.
    pub fn ratio(&self) -> f64 {
        if self.max == 0 {
            1.0
        } else {
            self.used as f64 / self.max as f64
        }
    }
}

/// Result of a describe with `If-Modified-Since`.
#[derive(Debug, Clone)]
pub enum Described {
    /// 304: the cached copy is still current.
    NotModified,
    /// 200: the describe and its `Last-Modified`.
    Fresh {
        /// The describe as JSON (kept whole for the cache).
        describe: Box<SObjectDescribe>,
        /// The `Last-Modified` header, to send back as `If-Modified-Since`.
        last_modified: Option<String>,
    },
}

/// Where and how to reach one org.
#[derive(Debug, Clone)]
pub struct OrgEndpoint {
    /// Tenant the org belongs to (a metric label).
    pub tenant: String,
    /// The OAuth login URL (also the JWT audience).
    pub login_url: String,
    /// API version without the `v`, e.g. `66.0`.
    pub api_version: String,
    /// How the integration user signs in.
    pub credentials: Credentials,
    /// Timeout of every request.
    pub timeout: Duration,
    /// An extra CA certificate (PEM) to trust, e.g. the emulator's with `--tls`.
    pub ca_certificate: Option<Vec<u8>>,
    /// What a booking does when the org's duplicate rules find a match.
    pub duplicate_rule: DuplicateRulePolicy,
}

/// A Salesforce REST client for one org: token handling, every resource portals-crm uses,
/// API usage tracking. Cheap to share behind an `Arc`.
pub struct SalesforceClient {
    endpoint: OrgEndpoint,
    http: reqwest::Client,
    tokens: TokenCache,
    usage: Mutex<Option<ApiUsage>>,
    /// The org's version list, or why it could not be read, and when
    /// ([`Self::check_api_version`]). An async lock: the 404s of a batch arriving together wait
    /// for one read instead of each sending its own.
    versions: tokio::sync::Mutex<Option<VersionList>>,
    metrics: Arc<Metrics>,
}

/// The org's version list as last read.
struct VersionList {
    read: Instant,
    listed: Result<Vec<String>, SalesforceError>,
}

impl VersionList {
    /// Whether it is recent enough to answer from: a list for [`VERSIONS_FOR`], a failed read for
    /// [`VERSIONS_RETRY`].
    fn fresh(&self) -> bool {
        let trusted = if self.listed.is_ok() {
            VERSIONS_FOR
        } else {
            VERSIONS_RETRY
        };
        self.read.elapsed() < trusted
    }
}

/// How long the org's version list is trusted: it changes only with Salesforce's releases, three
/// a year, so an hour keeps the check off every 404 that asks it.
const VERSIONS_FOR: Duration = Duration::from_secs(3600);

/// How long a failed read of the version list is kept before the next 404 tries again: long
/// enough that an org which cannot list its versions costs one extra request a minute, not one
/// per 404.
const VERSIONS_RETRY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for SalesforceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalesforceClient")
            .field("tenant", &self.endpoint.tenant)
            .field("login_url", &self.endpoint.login_url)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes one URL path segment (external id values hold `@`, `:`, spaces, `/`).
pub fn encode_segment(value: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'@')
        .remove(b':');
    percent_encoding::utf8_percent_encode(value, SEGMENT).to_string()
}

impl SalesforceClient {
    /// Builds a client; refuses a login URL that is neither https nor loopback.
    pub fn new(endpoint: OrgEndpoint, metrics: Arc<Metrics>) -> Result<Self, SalesforceError> {
        if !is_allowed_url(&endpoint.login_url) {
            return Err(SalesforceError::Refused(format!(
                "login URL {} must use https (http is allowed for loopback hosts only)",
                endpoint.login_url
            )));
        }
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &endpoint.ca_certificate {
            let certificate = reqwest::Certificate::from_pem(pem).map_err(|e| {
                SalesforceError::Refused(format!("the CA certificate is not PEM: {e}"))
            })?;
            builder = builder.add_root_certificate(certificate);
        }
        let http = builder
            .timeout(endpoint.timeout)
            .connect_timeout(endpoint.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| SalesforceError::Refused(format!("HTTP client: {e}")))?;
        Ok(Self {
            endpoint,
            http,
            tokens: TokenCache::default(),
            usage: Mutex::new(None),
            versions: tokio::sync::Mutex::new(None),
            metrics,
        })
    }

    /// The tenant this client serves.
    pub fn tenant(&self) -> &str {
        &self.endpoint.tenant
    }

    /// The API version in use, e.g. `66.0`.
    pub fn api_version(&self) -> &str {
        &self.endpoint.api_version
    }

    /// `/services/data/vXX.X`, the prefix of every resource and subrequest URL.
    pub fn data_path(&self) -> String {
        format!("/services/data/v{}", self.endpoint.api_version)
    }

    /// The last API usage Salesforce reported.
    pub fn api_usage(&self) -> Option<ApiUsage> {
        *self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current token, minted when there is none.
    pub async fn token(&self) -> Result<Arc<AccessToken>, SalesforceError> {
        let started = Instant::now();
        let fetched = self
            .tokens
            .get(
                &self.http,
                &self.endpoint.login_url,
                &self.endpoint.credentials,
            )
            .await;
        if fetched.minted {
            self.record_token(&fetched.token, started);
        }
        fetched.token
    }

    fn record_token(&self, result: &Result<Arc<AccessToken>, SalesforceError>, started: Instant) {
        let status = match result {
            Ok(_) => "200".to_owned(),
            Err(SalesforceError::Token { status, .. }) => status.to_string(),
            Err(_) => "error".to_owned(),
        };
        self.metrics.salesforce_request(
            &self.endpoint.tenant,
            "token",
            &status,
            started.elapsed().as_secs_f64(),
        );
    }

    /// The integration user's User Id, from the token's identity URL.
    pub async fn integration_user_id(&self) -> Result<String, SalesforceError> {
        Ok(self.token().await?.user_id.clone())
    }

    /// Sends one request, re-minting the token and replaying once on 401.
    async fn send(
        &self,
        kind: &'static str,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        headers: &[(&str, String)],
    ) -> Result<(StatusCode, header::HeaderMap, bytes::Bytes), SalesforceError> {
        // Serialised once, straight to bytes (not through a `Value`), and reused by a replay.
        let body = body
            .map(|b| serde_json::to_vec(b).map(bytes::Bytes::from))
            .transpose()
            .map_err(|e| SalesforceError::Decode {
                kind,
                message: e.to_string(),
            })?;
        if let Some(error) = self.known_not_offered() {
            return Err(error);
        }
        let mut token = self.token().await?;
        let mut replayed = false;
        loop {
            let url = format!("{}{}", token.instance_url, path);
            let mut request = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token.value.expose_secret())
                .header(header::ACCEPT, "application/json");
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            if let Some(body) = &body {
                request = request
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let started = Instant::now();
            let response = request.send().await;
            let elapsed = started.elapsed().as_secs_f64();
            let response = match response {
                Ok(response) => response,
                Err(e) => {
                    self.metrics
                        .salesforce_request(&self.endpoint.tenant, kind, "error", elapsed);
                    return Err(SalesforceError::Transport {
                        kind,
                        message: super::error::transport_message(e),
                    });
                }
            };
            let status = response.status();
            self.metrics
                .salesforce_request(&self.endpoint.tenant, kind, status.as_str(), elapsed);
            let headers = response.headers().clone();
            self.note_usage(&headers);
            let bytes = response
                .bytes()
                .await
                .map_err(|e| SalesforceError::Transport {
                    kind,
                    message: super::error::transport_message(e),
                })?;
            if status == StatusCode::UNAUTHORIZED && !replayed {
                replayed = true;
                let started = Instant::now();
                let refreshed = self
                    .tokens
                    .refresh(
                        &token,
                        &self.http,
                        &self.endpoint.login_url,
                        &self.endpoint.credentials,
                    )
                    .await;
                if refreshed.minted {
                    self.record_token(&refreshed.token, started);
                }
                token = refreshed.token?;
                continue;
            }
            if status.is_success() || status == StatusCode::NOT_MODIFIED || status.as_u16() == 300 {
                return Ok((status, headers, bytes));
            }
            // A version the org does not offer answers 404 on every resource, as a missing
            // record does: the org's version list (read once an hour) tells them apart, so a
            // typo in the tenant file is named instead of failing each booking as NOT_FOUND.
            if status == StatusCode::NOT_FOUND
                && let Err(error @ SalesforceError::VersionNotOffered { .. }) =
                    self.check_api_version().await
            {
                return Err(error);
            }
            return Err(api_error(kind, status, &headers, &bytes));
        }
    }

    fn note_usage(&self, headers: &header::HeaderMap) {
        let Some(usage) = headers
            .get("sforce-limit-info")
            .and_then(|v| v.to_str().ok())
            .and_then(ApiUsage::parse)
        else {
            return;
        };
        *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = Some(usage);
        self.metrics
            .api_usage_ratio
            .with_label_values(&[self.endpoint.tenant.as_str()])
            .set(usage.ratio());
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        kind: &'static str,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, SalesforceError> {
        let (_, _, bytes) = self.send(kind, method, path, body, &[]).await?;
        decode(kind, &bytes)
    }

    /// `POST /composite/graph`. Refuses more than 75 graphs or 500 nodes, as Salesforce would.
    /// The nodes may be owned or borrowed (`GraphRequest<&Subrequest>`): they are only
    /// serialised.
    pub async fn composite_graph<N: Serialize>(
        &self,
        request: &GraphRequest<N>,
    ) -> Result<GraphResponse, SalesforceError> {
        let nodes: usize = request
            .graphs
            .iter()
            .map(|g| g.composite_request.len())
            .sum();
        if request.graphs.len() > MAX_GRAPHS_PER_REQUEST || nodes > MAX_NODES_PER_REQUEST {
            return Err(SalesforceError::Refused(format!(
                "a Composite Graph request carries at most {MAX_GRAPHS_PER_REQUEST} graphs and \
                 {MAX_NODES_PER_REQUEST} nodes; this one has {} graphs and {nodes} nodes",
                request.graphs.len()
            )));
        }
        let path = format!("{}/composite/graph", self.data_path());
        // Graph nodes carry no headers of their own; the top-level one covers every node.
        let headers: Vec<(&str, String)> =
            self.endpoint.duplicate_rule.header().into_iter().collect();
        let (_, _, bytes) = self
            .send("graph", Method::POST, &path, Some(request), &headers)
            .await?;
        let response: GraphResponse = decode("graph", &bytes)?;
        self.metrics
            .graphs_per_request
            .with_label_values(&[self.endpoint.tenant.as_str()])
            .observe(request.graphs.len() as f64);
        Ok(response)
    }

    /// `POST /composite`. Refuses more than 25 subrequests.
    pub async fn composite(
        &self,
        request: &CompositeRequest,
    ) -> Result<CompositeResponse, SalesforceError> {
        if request.composite_request.len() > MAX_COMPOSITE_SUBREQUESTS {
            return Err(SalesforceError::Refused(format!(
                "a Composite request carries at most {MAX_COMPOSITE_SUBREQUESTS} subrequests; \
                 this one has {}",
                request.composite_request.len()
            )));
        }
        let path = format!("{}/composite", self.data_path());
        self.send_json("composite", Method::POST, &path, Some(request))
            .await
    }

    /// `PATCH /sobjects/{sobject}/{field}/{value}`: upsert by external id.
    pub async fn upsert(
        &self,
        sobject: &str,
        external_id_field: &str,
        external_id: &str,
        fields: &Value,
    ) -> Result<UpsertOutcome, SalesforceError> {
        let path = format!(
            "{}/sobjects/{}/{}/{}",
            self.data_path(),
            sobject,
            external_id_field,
            encode_segment(external_id)
        );
        let (status, _, bytes) = self
            .send("upsert", Method::PATCH, &path, Some(fields), &[])
            .await?;
        if status.as_u16() == 300 {
            return Err(SalesforceError::Api {
                kind: "upsert",
                status: 300,
                errors: vec![ApiError::multiple_choices(
                    &format!("{sobject}.{external_id_field}"),
                    &serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                )],
                retry_after: None,
            });
        }
        let result: SaveResult = decode("upsert", &bytes)?;
        Ok(match status.as_u16() {
            201 => UpsertOutcome::Created(result.id),
            _ => UpsertOutcome::Updated(result.id),
        })
    }

    /// `GET /sobjects/{sobject}/describe` with `If-Modified-Since` when a cached copy exists.
    pub async fn describe(
        &self,
        sobject: &str,
        if_modified_since: Option<&str>,
    ) -> Result<Described, SalesforceError> {
        let path = format!("{}/sobjects/{}/describe", self.data_path(), sobject);
        let headers: Vec<(&str, String)> = if_modified_since
            .map(|since| vec![("If-Modified-Since", since.to_owned())])
            .unwrap_or_default();
        let (status, response_headers, bytes) = self
            .send("describe", Method::GET, &path, None::<&Value>, &headers)
            .await?;
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Described::NotModified);
        }
        let describe: SObjectDescribe = decode("describe", &bytes)?;
        let last_modified = response_headers
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Described::Fresh {
            describe: Box::new(describe),
            last_modified,
        })
    }

    /// `GET /services/data/`: the REST API versions the org offers, oldest first (`["50.0", …,
    /// "66.0"]`; Salesforce lists them as `{label, url, version}` objects, and answers without a
    /// session). Sent on its own rather than through [`Self::send`], which asks it to explain a
    /// 404.
    pub async fn versions(&self) -> Result<Vec<String>, SalesforceError> {
        #[derive(serde::Deserialize)]
        struct Listed {
            version: String,
        }
        const KIND: &str = "versions";
        let token = self.token().await?;
        let started = Instant::now();
        let response = self
            .http
            .get(format!("{}/services/data/", token.instance_url))
            .header(header::ACCEPT, "application/json")
            .send()
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        let transport = |e: reqwest::Error| SalesforceError::Transport {
            kind: KIND,
            message: super::error::transport_message(e),
        };
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                self.metrics
                    .salesforce_request(&self.endpoint.tenant, KIND, "error", elapsed);
                return Err(transport(error));
            }
        };
        let status = response.status();
        self.metrics
            .salesforce_request(&self.endpoint.tenant, KIND, status.as_str(), elapsed);
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(transport)?;
        if !status.is_success() {
            return Err(api_error(KIND, status, &headers, &bytes));
        }
        let listed: Vec<Listed> = decode(KIND, &bytes)?;
        Ok(listed.into_iter().map(|v| v.version).collect())
    }

    /// Whether the org offers this client's API version, from its version list read at most
    /// once per [`VERSIONS_FOR`] (a failed read: once per [`VERSIONS_RETRY`]).
    ///
    /// # Errors
    /// [`SalesforceError::VersionNotOffered`] when it does not; the list's own error when it
    /// could not be read.
    pub async fn check_api_version(&self) -> Result<(), SalesforceError> {
        let mut cached = self.versions.lock().await;
        if !cached.as_ref().is_some_and(VersionList::fresh) {
            *cached = Some(VersionList {
                read: Instant::now(),
                listed: self.versions().await,
            });
        }
        let listed = cached.as_ref().map(|list| &list.listed);
        self.offered_in(listed.expect("set above"))
    }

    /// The check of this client's version against `listed`.
    fn offered_in(
        &self,
        listed: &Result<Vec<String>, SalesforceError>,
    ) -> Result<(), SalesforceError> {
        let offered = listed.as_ref().map_err(Clone::clone)?;
        if offered.iter().any(|v| v == self.api_version()) {
            Ok(())
        } else {
            Err(SalesforceError::VersionNotOffered {
                version: self.api_version().to_owned(),
                offered: offered.clone(),
            })
        }
    }

    /// [`SalesforceError::VersionNotOffered`] when the version list, still fresh, already says
    /// so: a request under that version would only answer 404 again. Never waits (a list being
    /// read counts as not known).
    fn known_not_offered(&self) -> Option<SalesforceError> {
        let cached = self.versions.try_lock().ok()?;
        let list = cached.as_ref().filter(|list| list.fresh())?;
        match self.offered_in(&list.listed) {
            Err(error @ SalesforceError::VersionNotOffered { .. }) => Some(error),
            _ => None,
        }
    }

    /// `GET /sobjects` (describeGlobal).
    pub async fn describe_global(&self) -> Result<DescribeGlobal, SalesforceError> {
        let path = format!("{}/sobjects", self.data_path());
        self.send_json("describe", Method::GET, &path, None::<&Value>)
            .await
    }

    /// `GET /query?q=…`, following `nextRecordsUrl` until done.
    pub async fn query(
        &self,
        soql: &str,
    ) -> Result<Vec<serde_json::Map<String, Value>>, SalesforceError> {
        let query: String = url::form_urlencoded::byte_serialize(soql.as_bytes()).collect();
        let mut path = format!("{}/query?q={}", self.data_path(), query);
        let mut records = Vec::new();
        loop {
            let page: QueryPage = self
                .send_json("query", Method::GET, &path, None::<&Value>)
                .await?;
            records.extend(page.records);
            match page.next_records_url {
                Some(next) if !page.done => path = next,
                _ => return Ok(records),
            }
        }
    }

    /// `GET /limits`.
    pub async fn limits(&self) -> Result<BTreeMap<String, Limit>, SalesforceError> {
        let path = format!("{}/limits", self.data_path());
        let raw: BTreeMap<String, Value> = self
            .send_json("limits", Method::GET, &path, None::<&Value>)
            .await?;
        Ok(raw
            .into_iter()
            .filter_map(|(name, value)| Some((name, serde_json::from_value(value).ok()?)))
            .collect())
    }
}

fn decode<T: DeserializeOwned>(kind: &'static str, bytes: &[u8]) -> Result<T, SalesforceError> {
    serde_json::from_slice(bytes).map_err(|e| SalesforceError::Decode {
        kind,
        message: e.to_string(),
    })
}

fn api_error(
    kind: &'static str,
    status: StatusCode,
    headers: &header::HeaderMap,
    bytes: &[u8],
) -> SalesforceError {
    let errors: Vec<ApiError> = serde_json::from_slice(bytes).unwrap_or_else(|_| {
        vec![ApiError::new(
            status.canonical_reason().unwrap_or("HTTP_ERROR"),
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            vec![],
        )]
    });
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    SalesforceError::Api {
        kind,
        status: status.as_u16(),
        errors,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_info_parses() {
        let usage = ApiUsage::parse("api-usage=18/5000, api-bursts=1/750").unwrap();
        assert_eq!(
            usage,
            ApiUsage {
                used: 18,
                max: 5000
            }
        );
        assert!((usage.ratio() - 0.0036).abs() < 1e-9);
        assert_eq!(ApiUsage::parse("per-app-api-usage=1/2"), None);
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(
            encode_segment("acme:jane doe@x.example/1"),
            "acme:jane%20doe@x.example%2F1"
        );
    }
}
