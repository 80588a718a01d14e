//! Serde types for the parts of Salesforce's REST API that portals-crm speaks.
//!
//! Shapes follow the REST API Developer Guide (see `../shared/salesforce-api.md`); the same types
//! are used by the emulator so both sides of the wire cannot drift apart.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

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
    /// With `DUPLICATES_DETECTED`: the duplicate rule's result, `{"duplicateRule", "duplicateRuleEntityType",
    /// "allowSave", "errorMessage", "matchResults": [{"entityType", "rule", "matchEngine", "size",
    /// "success", "errors", "matchRecords": [{"matchConfidence", "fieldDiffs", "additionalInformation",
    /// "record": {"attributes": {"type", "url"}, "Id"}}]}]}` (the SOAP API's DuplicateResult, as
    /// REST writes it: <https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_objects_duplicateresult.htm>;
    /// read the same way by the aiosalesforce client's `DuplicatesDetectedError`).
    #[serde(
        default,
        rename = "duplicateResult",
        skip_serializing_if = "Option::is_none"
    )]
    pub duplicate_result: Option<Value>,
}

impl ApiError {
    /// Builds an error object.
    pub fn new(code: &str, message: impl Into<String>, fields: Vec<String>) -> Self {
        Self {
            error_code: code.to_owned(),
            message: message.into(),
            fields,
            duplicate_result: None,
        }
    }

    /// The records a `DUPLICATES_DETECTED` matched, as `(sObject, id)` in the rule's order.
    pub fn duplicate_matches(&self) -> Vec<(String, String)> {
        let results = self
            .duplicate_result
            .as_ref()
            .and_then(|d| d.get("matchResults"))
            .and_then(Value::as_array);
        results
            .into_iter()
            .flatten()
            .flat_map(|result| {
                result
                    .get("matchRecords")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|m| {
                        let record = m.get("record")?;
                        let id = record.get("Id").and_then(Value::as_str)?;
                        let sobject = record
                            .pointer("/attributes/type")
                            .and_then(Value::as_str)
                            .or_else(|| result.get("entityType").and_then(Value::as_str))
                            .unwrap_or("record");
                        Some((sobject.to_owned(), id.to_owned()))
                    })
            })
            .collect()
    }

    /// This error with what the message alone does not say appended: the matched record ids of
    /// a `DUPLICATES_DETECTED` (`Use one of these records? (Standard_Lead_Duplicate_Rule
    /// matched Lead 00Q…, Contact 003…)`), so they reach the dead letter.
    pub fn explained(mut self) -> Self {
        let matches = self.duplicate_matches();
        if !matches.is_empty() {
            let rule = self
                .duplicate_result
                .as_ref()
                .and_then(|d| d.get("duplicateRule"))
                .and_then(Value::as_str)
                .unwrap_or("a duplicate rule")
                .to_owned();
            let list = matches
                .iter()
                .map(|(sobject, id)| format!("{sobject} {id}"))
                .collect::<Vec<_>>()
                .join(", ");
            self.message = format!("{} ({rule} matched {list})", self.message);
        }
        self
    }

    /// True for the placeholder Salesforce writes on a node that did not fail itself:
    /// `PROCESSING_HALTED` with "The transaction was rolled back since another operation in the
    /// same transaction failed." (every other node of a failed graph or allOrNone composite, and
    /// every node of a graph not run after 14 failed graphs), or "Execution halted as previous
    /// operation (…) was not successful." (a dependent of a failed subrequest). A
    /// `PROCESSING_HALTED` with any other message ("Invalid reference specified. No value for …")
    /// is the node's own error. Sources: Composite Graph responses
    /// (<https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_graph_introduction.htm>),
    /// allOrNone (<https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_allornone.htm>),
    /// Salesforce's ReVoman fixtures `composite/graph/resp/graph-response-error.json`.
    pub fn is_placeholder(&self) -> bool {
        self.error_code == "PROCESSING_HALTED"
            && (self.message == ROLLED_BACK_MESSAGE
                || self.message.starts_with(HALTED_BY_PREVIOUS_PREFIX))
    }

    /// The error for an upsert answered **300**: the external id matches several records, and
    /// Salesforce wrote nothing. The 300 body is the list of the matching records' URLs
    /// (`["/services/data/v66.0/sobjects/Lead/00Q…", …]`; "If the external ID matches multiple
    /// existing records, then a 300 error is returned, and no records are created or updated",
    /// <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_upsert_patch.htm>;
    /// status table <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm>).
    /// Salesforce sends no `errorCode` with it; the product names it [`MULTIPLE_CHOICES`] (HTTP
    /// 300's name) and puts the matching record ids in the message, e.g. `lead_0: the external
    /// id matches 2 records: 00Q…, 00Q… (nothing was written; merge or re-key them, then replay)`.
    pub fn multiple_choices(reference: &str, body: &Value) -> Self {
        let ids = matched_record_ids(body);
        let matched = if ids.is_empty() {
            "several records".to_owned()
        } else {
            format!("{} records: {}", ids.len(), ids.join(", "))
        };
        Self::new(
            MULTIPLE_CHOICES,
            format!(
                "{reference}: the external id matches {matched} (nothing was written; merge or \
                 re-key them, then replay)"
            ),
            vec![],
        )
    }
}

/// The code the product gives an upsert's HTTP 300 (the external id matches several records),
/// for which Salesforce sends no `errorCode`: reason `salesforce_multiple_choices`.
pub const MULTIPLE_CHOICES: &str = "MULTIPLE_CHOICES";

/// Prefix of the code the product gives a failed node whose body carries no Salesforce error
/// (an empty error array, `null`, or an object without `errors`): `HTTP_<status>`, e.g.
/// `HTTP_404`; classified by the status (5xx transient, else permanent).
pub const HTTP_STATUS_CODE_PREFIX: &str = "HTTP_";

/// The start of the placeholder message on a subrequest that depended on a failed one.
const HALTED_BY_PREVIOUS_PREFIX: &str = "Execution halted as previous operation (";

/// The record ids of a 300 body: each entry is a record URL (its last segment is the id) or a
/// record object with `Id`/`id` (accepted too, so a differently shaped list still names them).
fn matched_record_ids(body: &Value) -> Vec<String> {
    body.as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| match entry {
            Value::String(url) => url
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .map(str::to_owned),
            Value::Object(record) => record
                .get("Id")
                .or_else(|| record.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        })
        .filter(|id| !id.is_empty())
        .collect()
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
    pub body: Option<Body>,
}

/// A subrequest's JSON body: the text the planner wrote, or a tree.
///
/// Why two forms: a booking's upserts are planned once and sent once, so the planner writes
/// their bodies as JSON text ([`Body::fields`]) that the request copies as it is; a tree of
/// maps per node cost building, walking to serialise and freeing, and held several kilobytes
/// per booking in flight. Hand-built bodies (relations, the doctor's probes) and bodies the
/// repair paths change ([`Body::object_mut`]) are trees. Both serialise to the same JSON and
/// compare by their JSON value.
#[derive(Debug, Clone)]
pub enum Body {
    /// JSON text, written by serde_json (so valid JSON).
    Text(Box<RawValue>),
    /// A JSON tree.
    Tree(Value),
}

impl Body {
    /// A JSON object of `fields` in their order, written as text. Errors only if a value does
    /// not serialise (a `Value` always does).
    pub fn fields(fields: &[(&str, Value)]) -> Result<Self, serde_json::Error> {
        struct Fields<'a>(&'a [(&'a str, Value)]);
        impl Serialize for Fields<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_map(self.0.iter().map(|(field, value)| (field, value)))
            }
        }
        serde_json::value::to_raw_value(&Fields(fields)).map(Body::Text)
    }

    /// The body as a JSON value: a tree as it is, text read into one (`Null` if it does not
    /// parse, which text that serde_json wrote always does).
    pub fn value(&self) -> Cow<'_, Value> {
        match self {
            Body::Text(text) => Cow::Owned(serde_json::from_str(text.get()).unwrap_or(Value::Null)),
            Body::Tree(value) => Cow::Borrowed(value),
        }
    }

    /// The body's fields, for changing them: text is read into a tree first. `None` if the body
    /// is not a JSON object.
    pub fn object_mut(&mut self) -> Option<&mut serde_json::Map<String, Value>> {
        if let Body::Text(text) = self {
            *self = Body::Tree(serde_json::from_str(text.get()).ok()?);
        }
        match self {
            Body::Tree(value) => value.as_object_mut(),
            Body::Text(_) => None,
        }
    }
}

impl From<Value> for Body {
    fn from(value: Value) -> Self {
        Body::Tree(value)
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Body::Text(a), Body::Text(b)) if a.get() == b.get() => true,
            _ => self.value() == other.value(),
        }
    }
}

impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Body::Text(text) => text.serialize(serializer),
            Body::Tree(value) => value.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Body::Tree)
    }
}

/// One graph: nodes that commit or roll back together. `N` is [`Subrequest`], or
/// `&Subrequest` for a request serialised from nodes held elsewhere (the batcher's, which are
/// not copied to be sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Graph<N = Subrequest> {
    /// Unique within the request, < 40 characters, no `.`.
    pub graph_id: String,
    /// The nodes, in execution order.
    pub composite_request: Vec<N>,
}

/// Body of `POST /composite/graph`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphRequest<N = Subrequest> {
    /// The graphs of this request.
    pub graphs: Vec<Graph<N>>,
}

/// Result of one subrequest inside a Composite or Composite Graph response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubrequestResult {
    /// The subrequest's own body, as the JSON text Salesforce sent: an object on success, an
    /// error array on failure. Kept as text rather than a `Value` tree: of most bodies only the
    /// record id and `created` are read ([`SubrequestResult::record_id`]), and building and
    /// freeing a tree for every node was most of the cost of reading an answer.
    #[serde(default = "null_body")]
    pub body: Box<RawValue>,
    /// Response headers of the subrequest.
    #[serde(default)]
    pub http_headers: HttpHeaders,
    /// HTTP status of the subrequest.
    pub http_status_code: u16,
    /// The subrequest's reference id.
    pub reference_id: String,
}

/// A subrequest's headers: Salesforce sets `Location` on a create or upsert and nothing else
/// (Composite Graph response body, REST API Developer Guide).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpHeaders {
    /// The new or upserted record's URL.
    #[serde(rename = "Location", default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// The body of a subrequest that sent none.
fn null_body() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

/// What a SaveResult-shaped body (`{"id": …, "success": true, "errors": [], "created": …}`)
/// says, read from its text: the id without a copy unless the text escapes it.
#[derive(Deserialize)]
struct Saved<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    created: Option<bool>,
}

impl PartialEq for SubrequestResult {
    fn eq(&self, other: &Self) -> bool {
        self.body.get() == other.body.get()
            && self.http_headers == other.http_headers
            && self.http_status_code == other.http_status_code
            && self.reference_id == other.reference_id
    }
}

impl SubrequestResult {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.http_status_code)
    }

    /// The body as a `Value` (for the error paths, which read more of it).
    fn body_value(&self) -> Value {
        serde_json::from_str(self.body.get()).unwrap_or(Value::Null)
    }

    /// The body read as a SaveResult, when it is a JSON object (a derived struct would also
    /// read an array, by position).
    fn saved(&self) -> Option<Saved<'_>> {
        let text = self.body.get();
        text.trim_start()
            .starts_with('{')
            .then(|| serde_json::from_str(text).ok())
            .flatten()
    }

    /// The errors in the body when the subrequest failed (empty if the body is not an error array).
    pub fn errors(&self) -> Vec<ApiError> {
        serde_json::from_str(self.body.get()).unwrap_or_default()
    }

    /// The error this node reports, `None` on a 2xx. Its own error when it has one, in this
    /// order: a 300 ([`ApiError::multiple_choices`]); the first error of an error array that is
    /// not a placeholder ([`ApiError::is_placeholder`]); the first error of a SaveResult-shaped
    /// body (`{"success": false, "errors": […]}`); `HTTP_<status>` when the body carries no
    /// Salesforce error. A placeholder only when the node reports nothing else.
    pub fn node_error(&self) -> Option<ApiError> {
        if self.is_success() {
            return None;
        }
        let body = self.body_value();
        if self.http_status_code == 300 {
            return Some(ApiError::multiple_choices(&self.reference_id, &body));
        }
        let mut errors = self.errors();
        if errors.is_empty() {
            errors = body
                .get("errors")
                .cloned()
                .and_then(|e| serde_json::from_value(e).ok())
                .unwrap_or_default();
        }
        if let Some(own) = errors.iter().find(|e| !e.is_placeholder()) {
            return Some(own.clone().explained());
        }
        if let Some(placeholder) = errors.into_iter().next() {
            return Some(placeholder);
        }
        let mut body = body.to_string();
        if body.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|&i| body.is_char_boundary(i))
                .unwrap_or(0);
            body.truncate(cut);
            body.push('…');
        }
        Some(ApiError::new(
            &format!("{HTTP_STATUS_CODE_PREFIX}{}", self.http_status_code),
            format!(
                "{}: Salesforce answered {} without an error code: {body}",
                self.reference_id, self.http_status_code
            ),
            vec![],
        ))
    }

    /// The record id a create or upsert returned.
    pub fn record_id(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.saved()?.id
    }

    /// `Some(true)` when an upsert created the record, `Some(false)` when it updated one.
    pub fn created(&self) -> Option<bool> {
        self.created_by(self.saved().as_ref())
    }

    /// The record id a create or upsert returned and whether it created the record (as
    /// [`SubrequestResult::record_id`] and [`SubrequestResult::created`], the body read once).
    pub fn written(&self) -> Option<(std::borrow::Cow<'_, str>, bool)> {
        let saved = self.saved()?;
        let created = self.created_by(Some(&saved)).unwrap_or(false);
        Some((saved.id?, created))
    }

    fn created_by(&self, saved: Option<&Saved<'_>>) -> Option<bool> {
        match self.http_status_code {
            201 => Some(true),
            200 | 204 => Some(saved.and_then(|s| s.created).unwrap_or(false)),
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
    /// The error that made the graph fail: the first node that reports an error of its own
    /// ([`SubrequestResult::node_error`]), so a 300, an empty error array or an unresolvable
    /// reference is the cause, never the `PROCESSING_HALTED` placeholders of the nodes rolled
    /// back with it (the approach of Salesforce's own ReVoman models). A placeholder only when
    /// every node is one: the graph was not run at all (Salesforce stops after 14 failed graphs).
    pub fn root_error(&self) -> Option<ApiError> {
        let mut placeholder = None;
        for error in self
            .graph_response
            .composite_response
            .iter()
            .filter_map(SubrequestResult::node_error)
        {
            if !error.is_placeholder() {
                return Some(error);
            }
            placeholder.get_or_insert(error);
        }
        placeholder
    }

    /// The first node whose own error has one of `codes`, and that error.
    pub fn node_error_of(&self, codes: &[&str]) -> Option<(String, ApiError)> {
        self.graph_response
            .composite_response
            .iter()
            .find_map(|node| {
                node.node_error()
                    .filter(|e| codes.contains(&e.error_code.as_str()))
                    .map(|e| (node.reference_id.clone(), e))
            })
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
    fn a_body_written_as_text_is_sent_as_it_is_and_changed_as_a_tree() {
        let fields = [
            ("LastName", Value::String("O\"Brien".into())),
            ("Phone", Value::Null),
            ("BookMe__Version__c", Value::from(3)),
        ];
        let mut body = Body::fields(&fields).unwrap();
        let text = r#"{"LastName":"O\"Brien","Phone":null,"BookMe__Version__c":3}"#;
        let node = Subrequest {
            method: "PATCH".into(),
            url: "/services/data/v62.0/sobjects/Lead/Email/x".into(),
            reference_id: "lead_0".into(),
            body: Some(body.clone()),
        };
        let request = GraphRequest {
            graphs: vec![Graph {
                graph_id: "g0".into(),
                composite_request: vec![&node],
            }],
        };
        let sent = serde_json::to_string(&request).unwrap();
        assert!(sent.contains(&format!(r#""body":{text}"#)), "{sent}");
        let tree = Body::from(serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(body, tree, "text and tree of one value are equal");
        assert_eq!(body.value()["LastName"], "O\"Brien");
        body.object_mut().unwrap().remove("Phone");
        assert!(matches!(body, Body::Tree(_)));
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"BookMe__Version__c":3,"LastName":"O\"Brien"}"#
        );
        assert_ne!(body, tree);
        let array = Body::from(serde_json::json!([1]));
        assert!(array.clone().object_mut().is_none(), "not an object");
    }

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
        let result = failed_graph(vec![
            halted("a"),
            node(
                400,
                "b",
                serde_json::json!([{"errorCode": "DUPLICATE_VALUE", "fields": [], "message": "dup"}]),
            ),
        ]);
        assert_eq!(result.root_error().unwrap().error_code, "DUPLICATE_VALUE");
    }

    #[test]
    fn a_save_results_id_and_created_are_read_from_the_body_text() {
        let read = |status: u16, body: &str| {
            let text = format!(
                r#"{{"body":{body},"httpHeaders":{{}},"httpStatusCode":{status},"referenceId":"a"}}"#
            );
            let node: SubrequestResult = serde_json::from_str(&text).unwrap();
            let (id, created) = (node.record_id().map(|id| id.into_owned()), node.created());
            assert_eq!(
                node.written()
                    .map(|(id, created)| (id.into_owned(), created)),
                id.clone().map(|id| (id, created.unwrap_or(false))),
                "written() reads what record_id() and created() read"
            );
            (id, created)
        };
        let id = Some("00Q5g0000000001AAA".to_owned());
        assert_eq!(
            read(
                200,
                r#"{"id":"00Q5g0000000001AAA","success":true,"errors":[],"created":false}"#
            ),
            (id.clone(), Some(false))
        );
        assert_eq!(
            read(
                201,
                r#"{"id":"00Q\u0035g0000000001AAA","success":true,"errors":[]}"#
            ),
            (id, Some(true)),
            "an escaped id"
        );
        assert_eq!(
            read(200, r#" ["00Q5g0000000001AAA", true]"#),
            (None, Some(false)),
            "an array is not a SaveResult"
        );
        assert_eq!(read(204, "null"), (None, Some(false)));
        assert_eq!(
            read(400, r#"[{"errorCode":"X","message":"m"}]"#),
            (None, None)
        );
    }

    fn node(status: u16, reference: &str, body: Value) -> Value {
        serde_json::json!({"body": body, "httpHeaders": {}, "httpStatusCode": status, "referenceId": reference})
    }

    fn halted(reference: &str) -> Value {
        node(
            400,
            reference,
            serde_json::json!([{"errorCode": "PROCESSING_HALTED", "message": ROLLED_BACK_MESSAGE}]),
        )
    }

    fn failed_graph(nodes: Vec<Value>) -> GraphResult {
        let answer = serde_json::json!({
            "graphId": "g1", "isSuccessful": false,
            "graphResponse": {"compositeResponse": nodes}
        });
        serde_json::from_str(&answer.to_string()).unwrap()
    }

    #[test]
    fn a_300_node_is_the_root_error_with_the_matching_ids() {
        let result = failed_graph(vec![
            node(
                300,
                "lead_0",
                serde_json::json!([
                    "/services/data/v66.0/sobjects/Lead/00Q000000000001AAA",
                    "/services/data/v66.0/sobjects/Lead/00Q000000000002AAA"
                ]),
            ),
            halted("event"),
            halted("booking"),
        ]);
        let error = result.root_error().unwrap();
        assert_eq!(error.error_code, MULTIPLE_CHOICES);
        assert!(
            error.message.contains(
                "lead_0: the external id matches 2 records: 00Q000000000001AAA, 00Q000000000002AAA"
            ),
            "{}",
            error.message
        );
    }

    #[test]
    fn a_node_without_an_error_body_is_named_by_its_status() {
        for body in [
            serde_json::json!([]),
            Value::Null,
            serde_json::json!({"x": 1}),
        ] {
            let result = failed_graph(vec![halted("lead_0"), node(404, "event", body.clone())]);
            let error = result.root_error().unwrap();
            assert_eq!(error.error_code, "HTTP_404", "{body}");
            assert!(error.message.starts_with("event: Salesforce answered 404"));
        }
    }

    #[test]
    fn a_save_result_body_and_an_unresolvable_reference_are_own_errors() {
        let save = failed_graph(vec![
            halted("lead_0"),
            node(
                400,
                "event",
                serde_json::json!({"success": false, "errors": [{"statusCode": "FIELD_INTEGRITY_EXCEPTION", "message": "x", "fields": []}]}),
            ),
        ]);
        assert_eq!(
            save.root_error().unwrap().error_code,
            "FIELD_INTEGRITY_EXCEPTION"
        );
        let reference = failed_graph(vec![
            halted("lead_0"),
            node(
                400,
                "event",
                serde_json::json!([{"errorCode": "PROCESSING_HALTED", "message": "Invalid reference specified. No value for lead_0.id found in lead_0."}]),
            ),
        ]);
        let error = reference.root_error().unwrap();
        assert!(!error.is_placeholder(), "{error:?}");
        assert!(error.message.starts_with("Invalid reference"));
    }

    #[test]
    fn a_graph_never_run_reports_its_placeholder() {
        let result = failed_graph(vec![halted("lead_0"), halted("event")]);
        assert!(result.root_error().unwrap().is_placeholder());
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
