//! Serde types for the parts of Salesforce's REST API that portals-crm speaks.
//!
//! Shapes follow the REST API Developer Guide (see `../shared/salesforce-api.md`); the same types
//! are used by the emulator so both sides of the wire cannot drift apart.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Salesforce's limit on graphs in one Composite Graph request.
pub const MAX_GRAPHS_PER_REQUEST: usize = 75;
/// Salesforce's limit on nodes across all graphs of one Composite Graph request.
pub const MAX_NODES_PER_REQUEST: usize = 500;
/// Salesforce's limit on subrequests in one Composite request.
pub const MAX_COMPOSITE_SUBREQUESTS: usize = 25;
/// After this many failed graphs Salesforce stops processing the rest of the request.
pub const MAX_GRAPH_FAILURES_PER_REQUEST: usize = 14;
/// The message Salesforce puts on every node rolled back because a sibling failed.
pub const ROLLED_BACK_MESSAGE: &str =
    "The transaction was rolled back since another operation in the same transaction failed.";

/// One error object. Salesforce writes `errorCode` on REST resources and `statusCode` in
/// sObject Collections results; both deserialize into `error_code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// The error code, e.g. `INVALID_FIELD`.
    #[serde(rename = "errorCode", alias = "statusCode")]
    pub error_code: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// Fields the error is about, when Salesforce names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

impl ApiError {
    /// Builds an error object.
    pub fn new(code: &str, message: impl Into<String>, fields: Vec<String>) -> Self {
        Self {
            error_code: code.to_owned(),
            message: message.into(),
            fields,
        }
    }

    /// True for the placeholder Salesforce writes on nodes that did not fail themselves.
    pub fn is_processing_halted(&self) -> bool {
        self.error_code == "PROCESSING_HALTED"
    }
}

/// One subrequest of a Composite or Composite Graph request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subrequest {
    /// `GET`, `POST`, `PATCH`, `PUT` or `DELETE`.
    pub method: String,
    /// Full path beginning with `/services/data/vXX.X/`.
    pub url: String,
    /// Unique within its graph or composite request.
    pub reference_id: String,
    /// JSON body, absent for GET and DELETE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// One graph: nodes that commit or roll back together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Graph {
    /// Unique within the request, < 40 characters, no `.`.
    pub graph_id: String,
    /// The nodes, in execution order.
    pub composite_request: Vec<Subrequest>,
}

/// Body of `POST /composite/graph`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphRequest {
    /// The graphs of this request.
    pub graphs: Vec<Graph>,
}

/// Result of one subrequest inside a Composite or Composite Graph response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubrequestResult {
    /// The subrequest's own body: an object on success, an error array on failure.
    #[serde(default)]
    pub body: Value,
    /// Response headers of the subrequest (e.g. `Location`).
    #[serde(default)]
    pub http_headers: serde_json::Map<String, Value>,
    /// HTTP status of the subrequest.
    pub http_status_code: u16,
    /// The subrequest's reference id.
    pub reference_id: String,
}

impl SubrequestResult {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.http_status_code)
    }

    /// The errors in the body when the subrequest failed (empty if the body is not an error array).
    pub fn errors(&self) -> Vec<ApiError> {
        serde_json::from_value(self.body.clone()).unwrap_or_default()
    }

    /// The record id a create or upsert returned.
    pub fn record_id(&self) -> Option<&str> {
        self.body.get("id").and_then(Value::as_str)
    }

    /// `Some(true)` when an upsert created the record, `Some(false)` when it updated one.
    pub fn created(&self) -> Option<bool> {
        match self.http_status_code {
            201 => Some(true),
            200 | 204 => Some(
                self.body
                    .get("created")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            ),
            _ => None,
        }
    }
}

/// The `compositeResponse` wrapper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompositeResponse {
    /// One result per subrequest, in request order.
    pub composite_response: Vec<SubrequestResult>,
}

/// Result of one graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphResult {
    /// The graph's id, as sent.
    pub graph_id: String,
    /// The node results.
    pub graph_response: CompositeResponse,
    /// False when the graph was rolled back.
    pub is_successful: bool,
}

impl GraphResult {
    /// The error that made the graph fail: the first failed node whose error is not the
    /// PROCESSING_HALTED placeholder (the approach of Salesforce's own ReVoman models).
    pub fn root_error(&self) -> Option<ApiError> {
        let errors = self
            .graph_response
            .composite_response
            .iter()
            .filter(|node| !node.is_success())
            .flat_map(|node| node.errors());
        let mut first_halted = None;
        for error in errors {
            if !error.is_processing_halted() {
                return Some(error);
            }
            first_halted.get_or_insert(error);
        }
        first_halted
    }
}

/// Body of a Composite Graph response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphResponse {
    /// One result per graph, in request order.
    pub graphs: Vec<GraphResult>,
}

/// Body of `POST /composite`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompositeRequest {
    /// Roll back everything when one subrequest fails.
    #[serde(default)]
    pub all_or_none: bool,
    /// Let Salesforce bulkify unrelated subrequests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collate_subrequests: Option<bool>,
    /// The subrequests, in order.
    pub composite_request: Vec<Subrequest>,
}

/// Body of a single upsert/create result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveResult {
    /// The record id.
    pub id: String,
    /// Always true on a 2xx.
    pub success: bool,
    /// Empty on success.
    #[serde(default)]
    pub errors: Vec<ApiError>,
    /// True when an upsert created the record (v46.0+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
}

/// Outcome of an upsert by external id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpsertOutcome {
    /// 201: a new record.
    Created(String),
    /// 200: an existing record was updated.
    Updated(String),
}

/// One page of a SOQL query result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryPage {
    /// Total rows matched by the query (all pages).
    pub total_size: u64,
    /// False when `next_records_url` points at another page.
    pub done: bool,
    /// The rows of this page.
    pub records: Vec<serde_json::Map<String, Value>>,
    /// Path of the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_records_url: Option<String>,
}

/// One field of an sObject describe (the properties portals-crm uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldDescribe {
    /// API name.
    pub name: String,
    /// Label shown in Setup.
    pub label: String,
    /// Field type: string, email, datetime, reference, picklist, double, boolean, id, …
    #[serde(rename = "type")]
    pub field_type: String,
    /// Maximum length for text types, 0 otherwise.
    #[serde(default)]
    pub length: u32,
    /// Accepts null.
    pub nillable: bool,
    /// Writable on create by the running user.
    pub createable: bool,
    /// Writable on update by the running user.
    pub updateable: bool,
    /// Gets a value on create when none is given.
    #[serde(default)]
    pub defaulted_on_create: bool,
    /// An external id field (usable as an upsert key).
    #[serde(default)]
    pub external_id: bool,
    /// Unique across records.
    #[serde(default)]
    pub unique: bool,
    /// Custom field (`__c`).
    #[serde(default)]
    pub custom: bool,
    /// Objects a reference field may point at.
    #[serde(default)]
    pub reference_to: Vec<String>,
    /// Values of a picklist.
    #[serde(default)]
    pub picklist_values: Vec<PicklistValue>,
    /// A picklist that rejects values outside its list.
    #[serde(default)]
    pub restricted_picklist: bool,
}

impl FieldDescribe {
    /// The standard derivation of "required on create".
    pub fn required_on_create(&self) -> bool {
        self.createable && !self.nillable && !self.defaulted_on_create
    }
}

/// One picklist entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PicklistValue {
    /// Stored value.
    pub value: String,
    /// Label.
    pub label: String,
    /// Selectable.
    pub active: bool,
    /// The default value.
    #[serde(default)]
    pub default_value: bool,
}

/// An sObject describe, as the running user sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SObjectDescribe {
    /// API name.
    pub name: String,
    /// Label.
    pub label: String,
    /// Three-character id prefix.
    pub key_prefix: Option<String>,
    /// Custom object.
    pub custom: bool,
    /// The user may create records.
    pub createable: bool,
    /// The user may update records.
    pub updateable: bool,
    /// The user may delete records.
    pub deletable: bool,
    /// The user may read records.
    pub queryable: bool,
    /// Fields the user can see.
    pub fields: Vec<FieldDescribe>,
}

impl SObjectDescribe {
    /// The field with this API name (case-insensitive, as Salesforce matches names).
    pub fn field(&self, name: &str) -> Option<&FieldDescribe> {
        self.fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
    }
}

/// One entry of describeGlobal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalSObject {
    /// API name.
    pub name: String,
    /// Label.
    pub label: String,
    /// Three-character id prefix.
    pub key_prefix: Option<String>,
    /// Custom object.
    pub custom: bool,
    /// The user may create records.
    pub createable: bool,
    /// The user may update records.
    pub updateable: bool,
    /// The user may delete records.
    pub deletable: bool,
    /// The user may read records.
    pub queryable: bool,
}

/// Body of describeGlobal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeGlobal {
    /// Org encoding.
    pub encoding: String,
    /// Max rows per query batch.
    pub max_batch_size: u32,
    /// Objects available to the user.
    pub sobjects: Vec<GlobalSObject>,
}

/// One entry of `/services/data` (API versions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiVersion {
    /// Release label, e.g. "Summer '26".
    pub label: String,
    /// Path, e.g. `/services/data/v66.0`.
    pub url: String,
    /// Version number as text, e.g. "66.0".
    pub version: String,
}

/// One entry of `/limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Limit {
    /// Allocation.
    pub max: u64,
    /// What is left.
    pub remaining: u64,
}

/// Successful token response (JWT bearer and client credentials).
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The bearer token.
    pub access_token: String,
    /// Base URL for REST calls.
    pub instance_url: String,
    /// Identity URL `…/id/{orgId}/{userId}`.
    pub id: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Granted scopes.
    #[serde(default)]
    pub scope: Option<String>,
    /// Milliseconds since the epoch, as text.
    #[serde(default)]
    pub issued_at: Option<String>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"[redacted]")
            .field("instance_url", &self.instance_url)
            .field("id", &self.id)
            .finish()
    }
}

/// OAuth error body (`{"error": "invalid_grant", "error_description": "…"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuthError {
    /// OAuth error code.
    pub error: String,
    /// Description.
    #[serde(default)]
    pub error_description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_error_shapes_decode() {
        let rest: Vec<ApiError> = serde_json::from_str(
            r#"[{"fields":["Id"],"message":"bad id","errorCode":"MALFORMED_ID"}]"#,
        )
        .unwrap();
        let collections: Vec<ApiError> = serde_json::from_str(
            r#"[{"statusCode":"MALFORMED_ID","message":"bad id","fields":["Id"]}]"#,
        )
        .unwrap();
        assert_eq!(rest, collections);
        assert_eq!(rest[0].error_code, "MALFORMED_ID");
    }

    #[test]
    fn root_error_skips_processing_halted() {
        let result: GraphResult = serde_json::from_str(
            r#"{"graphId":"g1","isSuccessful":false,"graphResponse":{"compositeResponse":[
              {"body":[{"errorCode":"PROCESSING_HALTED","message":"rolled back"}],"httpHeaders":{},"httpStatusCode":400,"referenceId":"a"},
              {"body":[{"errorCode":"DUPLICATE_VALUE","fields":[],"message":"dup"}],"httpHeaders":{},"httpStatusCode":400,"referenceId":"b"}]}}"#,
        )
        .unwrap();
        assert_eq!(result.root_error().unwrap().error_code, "DUPLICATE_VALUE");
    }

    #[test]
    fn token_debug_hides_the_token() {
        let token = TokenResponse {
            access_token: "00Dsecret!token".into(),
            instance_url: "https://x".into(),
            id: "https://x/id/00D/005".into(),
            token_type: "Bearer".into(),
            scope: None,
            issued_at: None,
        };
        assert!(!format!("{token:?}").contains("secret"));
    }
}
