//! The org's request engine: one `execute` serves plain REST calls, Composite subrequests and
//! Composite Graph nodes, so all three behave the same way.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::org::{OrgSpec, RecordAccess, SObjectSpec};
use super::soql;
use super::store::{Ctx, Fields, Store, is_valid_id};
use crate::salesforce::model::{
    ApiError, Body, CompositeRequest, DescribeGlobal, GraphRequest, HttpHeaders,
    MAX_COMPOSITE_SUBREQUESTS, MAX_GRAPH_FAILURES_PER_REQUEST, MAX_GRAPHS_PER_REQUEST,
    MAX_NODES_PER_REQUEST, ROLLED_BACK_MESSAGE,
};

/// A response: status, JSON body (None for 204/304), extra headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Option<Value>,
    /// Extra headers (e.g. `Location`, `Last-Modified`).
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
            headers: vec![],
        }
    }

    fn empty(status: u16) -> Self {
        Self {
            status,
            body: None,
            headers: vec![],
        }
    }

    /// A Salesforce error array.
    pub fn errors(status: u16, errors: Vec<ApiError>) -> Self {
        Self::json(status, serde_json::to_value(errors).unwrap_or(Value::Null))
    }

    /// The 400 of a refused record write (DML). Salesforce always writes `fields` in these,
    /// `[]` when it names none (the failing node of the Composite Graph example in
    /// `tests/fixtures/salesforce/graph-response-error.json`), unlike request errors such as
    /// `NOT_FOUND` or `PROCESSING_HALTED`.
    pub fn record_errors(errors: Vec<ApiError>) -> Self {
        let body = errors
            .into_iter()
            .map(|e| {
                let fields = json!(e.fields);
                let mut error = serde_json::to_value(e).unwrap_or(Value::Null);
                if let Value::Object(error) = &mut error {
                    error.insert("fields".into(), fields);
                }
                error
            })
            .collect();
        Self::json(400, Value::Array(body))
    }

    /// A one-error Salesforce error array.
    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self::errors(status, vec![ApiError::new(code, message, vec![])])
    }

    fn not_found() -> Self {
        Self::error(404, "NOT_FOUND", "The requested resource does not exist")
    }

    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Request details that only some resources read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meta {
    /// `If-Modified-Since`.
    pub if_modified_since: Option<SystemTime>,
    /// From `Sforce-Query-Options: batchSize=N`.
    pub batch_size: Option<usize>,
    /// Fail one graph of this request with UNABLE_TO_LOCK_ROW (fault injection).
    pub lock_one_graph: bool,
    /// From `Sforce-Duplicate-Rule-Header: allowSave=true`: saves that a duplicate rule with
    /// an alert would refuse go through. Sent on the top-level request, it covers every
    /// subrequest and graph node (they have no headers of their own).
    pub allow_save: bool,
}

/// One request to a data resource, relative to `/services/data/vXX.X`.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path after the version, e.g. `sobjects/Lead/describe`.
    pub path: &'a str,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// JSON body.
    pub body: Option<&'a Value>,
}

/// The org's mutable state. Held under one mutex; no call awaits while holding it.
pub struct OrgState {
    /// The org model (permissions change at run time, through [`Arc::make_mut`]). Shared so
    /// that a call can hold an object's description while it changes the store.
    pub spec: Arc<OrgSpec>,
    /// Stored records.
    pub store: Store,
    /// username (lower case) → User Id.
    pub user_ids: HashMap<String, String>,
    /// API requests used today.
    pub api_used: u64,
    /// When the schema or permissions last changed (describe `Last-Modified`).
    pub schema_modified: SystemTime,
    cursors: HashMap<String, (Vec<Value>, u64)>,
    next_cursor: u64,
    /// `Meta::allow_save` of the call being executed.
    allow_save: bool,
}

fn whole_seconds(at: SystemTime) -> SystemTime {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

impl OrgState {
    /// A fresh org: only the users' records exist.
    pub fn new(spec: OrgSpec) -> Self {
        let (store, user_ids) = Store::with_users(&spec);
        Self {
            spec: Arc::new(spec),
            store,
            user_ids,
            api_used: 0,
            schema_modified: whole_seconds(SystemTime::now()),
            cursors: HashMap::new(),
            allow_save: false,
            next_cursor: 0,
        }
    }

    /// Marks the schema/permissions as changed now (describe clients see a new Last-Modified).
    pub fn touch_schema(&mut self) {
        let now = whole_seconds(SystemTime::now());
        self.schema_modified = if now > self.schema_modified {
            now
        } else {
            self.schema_modified + std::time::Duration::from_secs(1)
        };
    }

    /// The org id (derived, stable).
    pub fn org_id(&self) -> String {
        super::store::make_id("00D", 1)
    }

    /// Runs one request under `/services/data/vXX.X` as `username`.
    pub fn execute(&mut self, username: &str, version: &str, call: Call<'_>, meta: Meta) -> Reply {
        self.allow_save = meta.allow_save;
        let reply = self.dispatch(username, version, call, meta);
        self.store.commit();
        reply
    }

    fn dispatch(&mut self, username: &str, version: &str, call: Call<'_>, meta: Meta) -> Reply {
        let Call {
            method,
            path,
            query,
            body,
        } = call;
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            ("GET", ["sobjects"]) => self.describe_global(username),
            ("GET", ["sobjects", object, "describe"]) => self.describe(username, object, meta),
            ("GET", ["limits"]) => {
                let max = self.spec.org.daily_api_limit;
                Reply::json(
                    200,
                    json!({"DailyApiRequests": {"Max": max, "Remaining": max.saturating_sub(self.api_used)}}),
                )
            }
            ("GET", ["query"]) => {
                let soql = query
                    .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "q"))
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                self.query(username, version, &soql, meta)
            }
            ("GET", ["query", locator]) => self.next_page(version, locator),
            ("POST", ["composite"]) => self.composite(username, body),
            ("POST", ["composite", "graph"]) => self.graph(username, body, meta),
            _ if segments.first() == Some(&"sobjects") => {
                self.sobject_call(username, version, method, &segments[1..], body)
            }
            _ => Reply::not_found(),
        }
    }

    fn user_ctx(&self, username: &str) -> Option<(&super::org::UserSpec, &str)> {
        let user = self.spec.user(username)?;
        let id = self.user_ids.get(&username.to_ascii_lowercase())?;
        Some((user, id.as_str()))
    }

    /// True when `username` can see the record `id` (its sharing; see
    /// [`OrgSpec::record_access`]). An invisible record does not exist for that user: reads
    /// answer 404 and an upsert by external id does not match it.
    fn visible(&self, username: &str, record: &super::store::Record) -> bool {
        let Some((user, user_id)) = self.user_ctx(username) else {
            return false;
        };
        let ctx = Ctx {
            org: &self.spec,
            user,
            user_id,
            now: OffsetDateTime::now_utc(),
            allow_save: self.allow_save,
            version: None,
        };
        ctx.record_access(record) > RecordAccess::None
    }

    fn describe_global(&self, username: &str) -> Reply {
        let Some((user, _)) = self.user_ctx(username) else {
            return Reply::not_found();
        };
        let body = DescribeGlobal {
            encoding: "UTF-8".into(),
            max_batch_size: 200,
            sobjects: self.spec.global_for(user),
        };
        Reply::json(200, serde_json::to_value(body).unwrap_or(Value::Null))
    }

    fn describe(&self, username: &str, object: &str, meta: Meta) -> Reply {
        let Some((user, _)) = self.user_ctx(username) else {
            return Reply::not_found();
        };
        let Some(describe) = self
            .spec
            .sobject(object)
            .and_then(|o| self.spec.describe_for(user, o))
        else {
            return Reply::not_found();
        };
        let last_modified = (
            "Last-Modified",
            httpdate::fmt_http_date(self.schema_modified),
        );
        if meta
            .if_modified_since
            .is_some_and(|since| self.schema_modified <= since)
        {
            let mut reply = Reply::empty(304);
            reply.headers.push(last_modified);
            return reply;
        }
        let mut reply = Reply::json(200, serde_json::to_value(describe).unwrap_or(Value::Null));
        reply.headers.push(last_modified);
        reply
    }

    fn record_json(&self, version: &str, username: &str, id: &str) -> Option<Value> {
        let (user, _) = self.user_ctx(username)?;
        let record = self.store.get(id)?;
        let object = self.spec.sobject(&record.sobject)?;
        let describe = self.spec.describe_for(user, object)?;
        let mut out = Map::new();
        out.insert(
            "attributes".into(),
            json!({"type": record.sobject, "url": format!("/services/data/v{version}/sobjects/{}/{id}", record.sobject)}),
        );
        for field in &describe.fields {
            out.insert(
                field.name.clone(),
                record
                    .fields
                    .get(&field.name)
                    .cloned()
                    .unwrap_or(Value::Null),
            );
        }
        Some(Value::Object(out))
    }

    fn sobject_call(
        &mut self,
        username: &str,
        version: &str,
        method: &str,
        rest: &[&str],
        body: Option<&Value>,
    ) -> Reply {
        let spec = Arc::clone(&self.spec);
        let Some(object) = rest.first().and_then(|name| spec.sobject(name)) else {
            return Reply::not_found();
        };
        let readable = self
            .user_ctx(username)
            .is_some_and(|(user, _)| self.spec.object_access(user, &object.name).read);
        if !readable {
            return Reply::not_found();
        }
        let empty = Map::new();
        let fields = match body {
            Some(Value::Object(map)) => map,
            None => &empty,
            Some(_) => {
                return Reply::error(
                    400,
                    "JSON_PARSER_ERROR",
                    "Cannot deserialize instance of the sObject from a non-object value",
                );
            }
        };
        match (method, &rest[1..]) {
            ("POST", []) => match self.write(username, version, object, None, Fields::of(fields)) {
                Ok((id, _)) => {
                    let mut reply =
                        Reply::json(201, json!({"id": id, "success": true, "errors": []}));
                    reply.headers.push((
                        "Location",
                        format!("/services/data/v{version}/sobjects/{}/{id}", object.name),
                    ));
                    reply
                }
                Err(errors) => Reply::record_errors(errors),
            },
            (method, [id]) if is_valid_id(id) && id.starts_with(&object.key_prefix) => {
                // Salesforce answers 404 for a record the user cannot see ("verify that there
                // are no sharing issues", REST API status codes).
                let exists = self
                    .store
                    .get(id)
                    .is_some_and(|r| r.sobject == object.name && self.visible(username, r));
                if !exists {
                    return Reply::not_found();
                }
                let id = self
                    .store
                    .get(id)
                    .and_then(|r| r.fields.get("Id"))
                    .and_then(Value::as_str)
                    .unwrap_or(id)
                    .to_owned();
                match method {
                    "GET" => self
                        .record_json(version, username, &id)
                        .map(|v| Reply::json(200, v))
                        .unwrap_or_else(Reply::not_found),
                    "PATCH" => {
                        match self.write(username, version, object, Some(id), Fields::of(fields)) {
                            Ok(_) => Reply::empty(204),
                            Err(errors) => Reply::record_errors(errors),
                        }
                    }
                    "DELETE" => self.delete(username, object, &id),
                    _ => Reply::error(405, "METHOD_NOT_ALLOWED", "HTTP Method not allowed"),
                }
            }
            (method, [field, value]) => {
                self.external_id_call(username, version, method, object, field, value, fields)
            }
            _ => Reply::not_found(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn external_id_call(
        &mut self,
        username: &str,
        version: &str,
        method: &str,
        object: &SObjectSpec,
        field: &str,
        raw_value: &str,
        fields: &Map<String, Value>,
    ) -> Reply {
        let value = percent_encoding::percent_decode_str(raw_value)
            .decode_utf8_lossy()
            .into_owned();
        let Some(key_field) = object
            .fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(field))
        else {
            return Reply::not_found();
        };
        if !key_field.external_id && !key_field.unique {
            return Reply::error(
                400,
                "INVALID_FIELD",
                format!(
                    "Field {} is not an external id field on {}",
                    key_field.name, object.name
                ),
            );
        }
        // The match runs under the user's sharing: a record it cannot see is not matched, so
        // the upsert inserts and a unique external id then answers DUPLICATE_VALUE naming the
        // hidden record ("The Unique attribute prevents the creation of duplicates", upsert
        // docs: https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_upsert_patch.htm).
        let matches: Vec<String> = self
            .store
            .find_by_external_id(&object.name, &key_field.name, &value)
            .into_iter()
            .filter(|id| {
                self.store
                    .get(id)
                    .is_some_and(|r| self.visible(username, r))
            })
            .collect();
        // "If the external ID matches multiple existing records, then a 300 error is returned,
        // and no records are created or updated"; the body lists the matching records' URLs
        // (https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_upsert_patch.htm).
        // Inside a graph the node keeps this status and body; its siblings get PROCESSING_HALTED.
        if matches.len() > 1 {
            let urls: Vec<String> = matches
                .iter()
                .map(|id| format!("/services/data/v{version}/sobjects/{}/{id}", object.name))
                .collect();
            return Reply::json(300, json!(urls));
        }
        let existing = matches.into_iter().next();
        match (method, existing) {
            ("GET", Some(id)) => self
                .record_json(version, username, &id)
                .map(|v| Reply::json(200, v))
                .unwrap_or_else(Reply::not_found),
            ("GET", None) | ("DELETE", None) => Reply::not_found(),
            ("DELETE", Some(id)) => self.delete(username, object, &id),
            ("PATCH" | "POST", existing) => {
                let value = Value::String(value);
                let body = Fields {
                    body: fields,
                    key: Some((&key_field.name, existing.is_none().then_some(&value))),
                };
                match self.write(username, version, object, existing, body) {
                    Ok((id, created)) => {
                        let mut reply = Reply::json(
                            if created { 201 } else { 200 },
                            json!({"id": id, "success": true, "errors": [], "created": created}),
                        );
                        reply.headers.push((
                            "Location",
                            format!("/services/data/v{version}/sobjects/{}/{id}", object.name),
                        ));
                        reply
                    }
                    Err(errors) => Reply::record_errors(errors),
                }
            }
            _ => Reply::error(405, "METHOD_NOT_ALLOWED", "HTTP Method not allowed"),
        }
    }

    fn write(
        &mut self,
        username: &str,
        version: &str,
        object: &SObjectSpec,
        id: Option<String>,
        body: Fields<'_>,
    ) -> Result<(String, bool), Vec<ApiError>> {
        let Self {
            spec,
            store,
            user_ids,
            ..
        } = self;
        let user = spec
            .user(username)
            .ok_or_else(|| vec![ApiError::new("INVALID_SESSION_ID", "unknown user", vec![])])?;
        let user_id = user_ids
            .get(&username.to_ascii_lowercase())
            .map(String::as_str)
            .unwrap_or_default();
        let ctx = Ctx {
            org: spec,
            user,
            user_id,
            now: OffsetDateTime::now_utc(),
            allow_save: self.allow_save,
            version: Some(version),
        };
        match id {
            Some(id) => store.update(&ctx, object, &id, body).map(|()| (id, false)),
            None => store.create(&ctx, object, body).map(|id| (id, true)),
        }
    }

    fn delete(&mut self, username: &str, object: &SObjectSpec, id: &str) -> Reply {
        let Self {
            spec,
            store,
            user_ids,
            ..
        } = self;
        let Some(user) = spec.user(username) else {
            return Reply::not_found();
        };
        let ctx = Ctx {
            org: spec,
            user,
            user_id: user_ids
                .get(&username.to_ascii_lowercase())
                .map(String::as_str)
                .unwrap_or_default(),
            now: OffsetDateTime::now_utc(),
            allow_save: self.allow_save,
            version: None,
        };
        match store.delete(&ctx, object, id) {
            Ok(()) => Reply::empty(204),
            Err(errors) => Reply::record_errors(errors),
        }
    }

    fn query(&mut self, username: &str, version: &str, soql: &str, meta: Meta) -> Reply {
        let parsed = match soql::parse(soql) {
            Ok(q) => q,
            Err(message) => return Reply::error(400, "MALFORMED_QUERY", message),
        };
        let Some((user, _)) = self.user_ctx(username) else {
            return Reply::not_found();
        };
        let Some(describe) = self
            .spec
            .sobject(&parsed.sobject)
            .and_then(|o| self.spec.describe_for(user, o))
        else {
            return Reply::error(
                400,
                "INVALID_TYPE",
                format!("sObject type '{}' is not supported.", parsed.sobject),
            );
        };
        let columns = match self.columns(user, &describe, &parsed) {
            Ok(columns) => columns,
            Err(reply) => return reply,
        };
        let conditions: Vec<(&soql::Condition, &Column)> =
            parsed.conditions.iter().zip(&columns.conditions).collect();
        let mut rows: Vec<Value> = self
            .store
            .all(&describe.name)
            .into_iter()
            .filter(|r| {
                conditions
                    .iter()
                    .all(|(c, column)| c.matches_value(self.column_value(r, column).as_ref()))
            })
            .filter(|r| self.visible(username, r))
            .take(parsed.limit.unwrap_or(usize::MAX))
            .map(|r| {
                let mut row = Map::new();
                row.insert("attributes".into(), self.attributes(version, r));
                for column in &columns.select {
                    self.put_column(version, &mut row, r, column);
                }
                for typeof_ in &parsed.typeofs {
                    let related = r
                        .fields
                        .iter()
                        .find(|(k, _)| {
                            k.eq_ignore_ascii_case(&format!("{}Id", typeof_.relationship))
                        })
                        .and_then(|(_, v)| v.as_str())
                        .and_then(|id| self.store.get(id));
                    let value = related.map_or(Value::Null, |target| {
                        let mut object = Map::new();
                        object.insert("attributes".into(), self.attributes(version, target));
                        if let Some((_, fields)) = typeof_
                            .whens
                            .iter()
                            .find(|(t, _)| t.eq_ignore_ascii_case(&target.sobject))
                        {
                            for field in fields {
                                object.insert(
                                    field.clone(),
                                    target.fields.get(field).cloned().unwrap_or(Value::Null),
                                );
                            }
                        }
                        Value::Object(object)
                    });
                    row.insert(typeof_.relationship.clone(), value);
                }
                Value::Object(row)
            })
            .collect();
        let total = rows.len() as u64;
        let batch = meta
            .batch_size
            .map(|n| n.clamp(200, 2000))
            .unwrap_or(self.spec.org.query_batch_size)
            .max(1);
        let rest = if rows.len() > batch {
            rows.split_off(batch)
        } else {
            Vec::new()
        };
        self.page(version, rows, rest, total, batch)
    }

    /// Checks every selected and filtered name against the schema as `user` sees it, the
    /// way Salesforce answers a bad one (400 `INVALID_FIELD`).
    fn columns(
        &self,
        user: &super::org::UserSpec,
        describe: &crate::salesforce::model::SObjectDescribe,
        parsed: &soql::Query,
    ) -> Result<Columns, Reply> {
        let no_column = |name: &str, entity: &str| {
            Reply::error(
                400,
                "INVALID_FIELD",
                format!("No such column '{name}' on entity '{entity}'."),
            )
        };
        let column = |name: &str| -> Result<Column, Reply> {
            let Some((relationship, field)) = name.split_once('.') else {
                return describe
                    .field(name)
                    .map(|f| Column::Field(f.name.clone()))
                    .ok_or_else(|| no_column(name, &describe.name));
            };
            let reference = describe
                .fields
                .iter()
                .find(|f| {
                    f.field_type == "reference"
                        && relationship_name(&f.name).eq_ignore_ascii_case(relationship)
                })
                .ok_or_else(|| {
                    Reply::error(
                        400,
                        "INVALID_FIELD",
                        format!(
                            "Didn't understand relationship '{relationship}' in field path. If \
                             you are attempting to use a custom relationship, be sure to append \
                             the '__r' after the custom relationship name. Please reference \
                             your WSDL or the describe call for the appropriate names."
                        ),
                    )
                })?;
            let name_field = match reference.reference_to.as_slice() {
                // A polymorphic relationship reaches only the fields every target has (the
                // Name object); the others need TYPEOF.
                [_, _, ..] => ["Id", "Type"]
                    .into_iter()
                    .find(|n| n.eq_ignore_ascii_case(field))
                    .map(str::to_owned)
                    .ok_or_else(|| no_column(field, "Name"))?,
                [target] => self
                    .spec
                    .sobject(target)
                    .and_then(|o| self.spec.describe_for(user, o))
                    .and_then(|d| d.field(field).map(|f| f.name.clone()))
                    .ok_or_else(|| no_column(field, target))?,
                [] => return Err(no_column(field, relationship)),
            };
            Ok(Column::Parent {
                reference: reference.name.clone(),
                relationship: relationship_name(&reference.name),
                field: name_field,
            })
        };
        let select = parsed
            .fields
            .iter()
            .map(|n| column(n))
            .collect::<Result<Vec<_>, _>>()?;
        let conditions = parsed
            .conditions
            .iter()
            .map(|c| column(&c.field))
            .collect::<Result<Vec<_>, _>>()?;
        for typeof_ in &parsed.typeofs {
            let polymorphic = describe.fields.iter().any(|f| {
                f.reference_to.len() > 1
                    && relationship_name(&f.name).eq_ignore_ascii_case(&typeof_.relationship)
            });
            if !polymorphic {
                return Err(Reply::error(
                    400,
                    "MALFORMED_QUERY",
                    format!(
                        "TYPEOF: '{}' is not a polymorphic relationship of {}",
                        typeof_.relationship, describe.name
                    ),
                ));
            }
            for (target, fields) in &typeof_.whens {
                let target_describe = self
                    .spec
                    .sobject(target)
                    .and_then(|o| self.spec.describe_for(user, o))
                    .ok_or_else(|| no_column(target, &typeof_.relationship))?;
                if let Some(missing) = fields.iter().find(|f| target_describe.field(f).is_none()) {
                    return Err(no_column(missing, target));
                }
            }
        }
        Ok(Columns { select, conditions })
    }

    fn attributes(&self, version: &str, record: &super::store::Record) -> Value {
        let id = record
            .fields
            .get("Id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        json!({"type": record.sobject, "url": format!("/services/data/v{version}/sobjects/{}/{id}", record.sobject)})
    }

    fn column_value(&self, record: &super::store::Record, column: &Column) -> Option<Value> {
        match column {
            Column::Field(name) => record.fields.get(name).cloned(),
            Column::Parent {
                reference, field, ..
            } => {
                let parent = record
                    .fields
                    .get(reference)
                    .and_then(Value::as_str)
                    .and_then(|id| self.store.get(id))?;
                if field == "Type" {
                    return Some(Value::String(parent.sobject.clone()));
                }
                parent.fields.get(field).cloned()
            }
        }
    }

    /// A selected column in a row: a field, or the parent's object with its selected fields.
    fn put_column(
        &self,
        version: &str,
        row: &mut Map<String, Value>,
        record: &super::store::Record,
        column: &Column,
    ) {
        match column {
            Column::Field(name) => {
                row.insert(
                    name.clone(),
                    record.fields.get(name).cloned().unwrap_or(Value::Null),
                );
            }
            Column::Parent {
                reference,
                relationship,
                field,
            } => {
                let parent = record
                    .fields
                    .get(reference)
                    .and_then(Value::as_str)
                    .and_then(|id| self.store.get(id));
                let Some(parent) = parent else {
                    row.insert(relationship.clone(), Value::Null);
                    return;
                };
                let value = self.column_value(record, column).unwrap_or(Value::Null);
                let entry = row
                    .entry(relationship.clone())
                    .or_insert_with(|| json!({"attributes": self.attributes(version, parent)}));
                if let Value::Object(object) = entry {
                    object.insert(field.clone(), value);
                }
            }
        }
    }

    fn page(
        &mut self,
        version: &str,
        rows: Vec<Value>,
        rest: Vec<Value>,
        total: u64,
        batch: usize,
    ) -> Reply {
        let mut body = json!({"totalSize": total, "done": rest.is_empty(), "records": rows});
        if !rest.is_empty() {
            self.next_cursor += 1;
            let locator = format!(
                "{}-{}",
                super::store::make_id("01g", self.next_cursor),
                batch
            );
            body["nextRecordsUrl"] = json!(format!("/services/data/v{version}/query/{locator}"));
            self.cursors.insert(locator, (rest, total));
        }
        Reply::json(200, body)
    }

    fn next_page(&mut self, version: &str, locator: &str) -> Reply {
        let Some((mut rows, total)) = self.cursors.remove(locator) else {
            return Reply::error(400, "INVALID_QUERY_LOCATOR", "invalid query locator");
        };
        let batch = locator
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(2000usize)
            .max(1);
        let rest = if rows.len() > batch {
            rows.split_off(batch)
        } else {
            Vec::new()
        };
        self.page(version, rows, rest, total, batch)
    }

    /// Runs one subrequest (Composite or Graph) whose URL is a full `/services/data/vXX.X/…`.
    fn subrequest(
        &mut self,
        username: &str,
        method: &str,
        url: &str,
        body: Option<&Value>,
        graph_node: bool,
    ) -> Reply {
        let (path, query) = url
            .split_once('?')
            .map_or((url, None), |(p, q)| (p, Some(q)));
        let Some(rest) = path.strip_prefix("/services/data/v") else {
            return Reply::error(
                400,
                "INVALID_URL",
                format!("The URL must start with /services/data/vXX.X/: {url}"),
            );
        };
        let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
        if graph_node && !rest.starts_with("sobjects/") {
            return Reply::error(
                400,
                "INVALID_GRAPH_NODE",
                format!("Composite Graph nodes support only sObject resources: {url}"),
            );
        }
        self.dispatch(
            username,
            version,
            Call {
                method,
                path: rest,
                query,
                body,
            },
            Meta::default(),
        )
    }

    fn composite(&mut self, username: &str, body: Option<&Value>) -> Reply {
        let request: CompositeRequest = match body.map(CompositeRequest::deserialize) {
            Some(Ok(r)) => r,
            Some(Err(e)) => return Reply::error(400, "JSON_PARSER_ERROR", e.to_string()),
            None => return Reply::error(400, "JSON_PARSER_ERROR", "body required"),
        };
        if request.composite_request.len() > MAX_COMPOSITE_SUBREQUESTS {
            return Reply::error(
                400,
                "LIMIT_EXCEEDED",
                format!(
                    "Composite request may contain at most {MAX_COMPOSITE_SUBREQUESTS} \
                     subrequests"
                ),
            );
        }
        let mark = self.store.mark();
        let mut outputs: HashMap<String, usize> = HashMap::new();
        let mut failed: Vec<String> = Vec::new();
        let mut results: Vec<NodeAnswer> = Vec::new();
        let mut any_failure = false;
        for sub in &request.composite_request {
            if !valid_reference_id(&sub.reference_id) {
                return Reply::error(
                    400,
                    "INVALID_REFERENCE_ID",
                    format!("Invalid referenceId: {}", sub.reference_id),
                );
            }
            let answers = Answers {
                at: &outputs,
                results: &results,
            };
            let reply = match resolve_all(&sub.url, sub.body.as_ref(), answers, &failed) {
                Ok((url, body)) => {
                    self.subrequest(username, &sub.method, &url, body.as_deref(), false)
                }
                Err(message) => Reply::error(400, "PROCESSING_HALTED", message),
            };
            if reply.is_success() {
                outputs.insert(sub.reference_id.clone(), results.len());
            } else {
                any_failure = true;
                failed.push(sub.reference_id.clone());
            }
            results.push(NodeAnswer::new(&sub.reference_id, reply));
        }
        if request.all_or_none && any_failure {
            self.store.rollback(mark, &self.spec);
            for (result, sub) in results.iter_mut().zip(&request.composite_request) {
                if !failed.contains(&sub.reference_id) {
                    *result = NodeAnswer::halted(&sub.reference_id, ROLLED_BACK_MESSAGE);
                }
            }
        }
        Reply::json(200, json!({"compositeResponse": results}))
    }

    /// `POST /composite/graph` with a body already read as a graph request (what the server
    /// does for the hot path, instead of reading it into a `Value` first); as
    /// [`OrgState::execute`] otherwise.
    pub fn execute_graph(
        &mut self,
        username: &str,
        request: GraphRequest,
        meta: Meta,
    ) -> GraphReply {
        self.allow_save = meta.allow_save;
        let reply = self.run_graphs(username, request, meta);
        self.store.commit();
        reply
    }

    fn graph(&mut self, username: &str, body: Option<&Value>, meta: Meta) -> Reply {
        match body.map(GraphRequest::deserialize) {
            Some(Ok(request)) => self.run_graphs(username, request, meta).into_reply(),
            Some(Err(e)) => Reply::error(400, "JSON_PARSER_ERROR", e.to_string()),
            None => Reply::error(400, "JSON_PARSER_ERROR", "body required"),
        }
    }

    fn run_graphs(&mut self, username: &str, request: GraphRequest, meta: Meta) -> GraphReply {
        let nodes: usize = request
            .graphs
            .iter()
            .map(|g| g.composite_request.len())
            .sum();
        if request.graphs.len() > MAX_GRAPHS_PER_REQUEST || nodes > MAX_NODES_PER_REQUEST {
            return GraphReply::Refused(Reply::error(
                400,
                "LIMIT_EXCEEDED",
                format!(
                    "A Composite Graph request may contain at most {MAX_GRAPHS_PER_REQUEST} \
                     graphs and {MAX_NODES_PER_REQUEST} nodes; it has {} graphs and {nodes} nodes",
                    request.graphs.len()
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for graph in &request.graphs {
            if graph.graph_id.is_empty()
                || graph.graph_id.len() >= 40
                || graph.graph_id.contains('.')
                || !seen.insert(graph.graph_id.as_str())
            {
                return GraphReply::Refused(Reply::error(
                    400,
                    "INVALID_GRAPH_ID",
                    format!("Invalid or duplicate graphId: {}", graph.graph_id),
                ));
            }
        }
        let locked = meta
            .lock_one_graph
            .then(|| rand::thread_rng().gen_range(0..request.graphs.len().max(1)));
        let mut failures = 0usize;
        let mut out = Vec::with_capacity(request.graphs.len());
        for (index, graph) in request.graphs.iter().enumerate() {
            if failures >= MAX_GRAPH_FAILURES_PER_REQUEST {
                let results = graph
                    .composite_request
                    .iter()
                    .map(|n| NodeAnswer::halted(&n.reference_id, ROLLED_BACK_MESSAGE))
                    .collect();
                out.push(GraphAnswer::new(&graph.graph_id, results, false));
                continue;
            }
            let mark = self.store.mark();
            let mut outputs: HashMap<String, usize> = HashMap::new();
            let mut results: Vec<NodeAnswer> = Vec::with_capacity(graph.composite_request.len());
            let mut failed_at: Option<usize> = None;
            for (i, node) in graph.composite_request.iter().enumerate() {
                let reply = if locked == Some(index) {
                    Reply::error(
                        400,
                        "UNABLE_TO_LOCK_ROW",
                        "unable to obtain exclusive access to this record or 1 records",
                    )
                } else if !valid_reference_id(&node.reference_id) {
                    Reply::error(
                        400,
                        "INVALID_REFERENCE_ID",
                        format!("Invalid referenceId: {}", node.reference_id),
                    )
                } else {
                    let answers = Answers {
                        at: &outputs,
                        results: &results,
                    };
                    match resolve_all(&node.url, node.body.as_ref(), answers, &[]) {
                        Ok((url, body)) => {
                            self.subrequest(username, &node.method, &url, body.as_deref(), true)
                        }
                        Err(message) => Reply::error(400, "PROCESSING_HALTED", message),
                    }
                };
                let success = reply.is_success();
                results.push(NodeAnswer::new(&node.reference_id, reply));
                if !success {
                    failed_at = Some(i);
                    break;
                }
                outputs.insert(node.reference_id.clone(), results.len() - 1);
            }
            let successful = failed_at.is_none();
            if let Some(failed) = failed_at {
                failures += 1;
                self.store.rollback(mark, &self.spec);
                let mut real_error = results.pop();
                results = graph
                    .composite_request
                    .iter()
                    .enumerate()
                    .map(|(i, node)| {
                        (if i == failed { real_error.take() } else { None }).unwrap_or_else(|| {
                            NodeAnswer::halted(&node.reference_id, ROLLED_BACK_MESSAGE)
                        })
                    })
                    .collect();
            }
            out.push(GraphAnswer::new(&graph.graph_id, results, successful));
        }
        GraphReply::Answered(GraphAnswers { graphs: out })
    }
}

/// A column of a query, resolved against the schema.
enum Column {
    /// A field of the queried object.
    Field(String),
    /// A field of the record a reference field points at.
    Parent {
        /// The reference field, e.g. `EventId`.
        reference: String,
        /// Its relationship name, e.g. `Event`.
        relationship: String,
        /// The parent's field.
        field: String,
    },
}

/// The selected and filtered columns of a query (conditions in their order).
struct Columns {
    select: Vec<Column>,
    conditions: Vec<Column>,
}

/// A reference field's relationship name: `EventId` → `Event`, `Lead__c` → `Lead__r`.
fn relationship_name(field: &str) -> String {
    if let Some(custom) = field.strip_suffix("__c") {
        format!("{custom}__r")
    } else {
        field.strip_suffix("Id").unwrap_or(field).to_owned()
    }
}

fn valid_reference_id(reference: &str) -> bool {
    reference
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A JSON object of `entries`, built in place: `json!` serialises every interpolated value into a
/// copy, which for a Composite answer copied every result three times.
/// What `POST /composite/graph` answers: the graphs' answers, or the request refused whole.
#[derive(Debug)]
pub enum GraphReply {
    /// 200 with one answer per graph.
    Answered(GraphAnswers),
    /// The request broke a limit or named a graph wrongly; nothing ran.
    Refused(Reply),
}

impl GraphReply {
    /// As a [`Reply`] (the general path, and tests that read the answer as a `Value`).
    pub fn into_reply(self) -> Reply {
        match self {
            Self::Answered(answers) => {
                Reply::json(200, serde_json::to_value(answers).unwrap_or(Value::Null))
            }
            Self::Refused(reply) => reply,
        }
    }
}

/// A Composite Graph answer's body, written straight to JSON: built as `Value` trees (a map and
/// its keys per node) and then written, it was a tenth of the emulator's time.
#[derive(Debug, Serialize)]
pub struct GraphAnswers {
    graphs: Vec<GraphAnswer>,
}

/// One graph's entry in a Composite Graph answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GraphAnswer {
    graph_id: String,
    graph_response: NodeAnswers,
    is_successful: bool,
}

impl GraphAnswer {
    fn new(graph_id: &str, results: Vec<NodeAnswer>, successful: bool) -> Self {
        Self {
            graph_id: graph_id.to_owned(),
            graph_response: NodeAnswers {
                composite_response: results,
            },
            is_successful: successful,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeAnswers {
    composite_response: Vec<NodeAnswer>,
}

/// One subrequest's entry in a Composite or Composite Graph answer (the shape of
/// [`crate::salesforce::model::SubrequestResult`], with the body as the emulator holds it).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeAnswer {
    body: Value,
    http_headers: HttpHeaders,
    http_status_code: u16,
    reference_id: String,
}

impl NodeAnswer {
    fn new(reference: &str, reply: Reply) -> Self {
        let location = reply
            .headers
            .into_iter()
            .find_map(|(name, value)| (name == "Location").then_some(value));
        Self {
            body: reply.body.unwrap_or(Value::Null),
            http_headers: HttpHeaders { location },
            http_status_code: reply.status,
            reference_id: reference.to_owned(),
        }
    }

    /// A node rolled back or never run because another failed.
    fn halted(reference: &str, message: &str) -> Self {
        Self {
            body: json!([{"errorCode": "PROCESSING_HALTED", "message": message}]),
            http_headers: HttpHeaders::default(),
            http_status_code: 400,
            reference_id: reference.to_owned(),
        }
    }
}

/// The answers of the nodes run so far, which later nodes reference: each successful node's
/// referenceId and where its result sits among the results.
#[derive(Clone, Copy)]
struct Answers<'a> {
    at: &'a HashMap<String, usize>,
    results: &'a [NodeAnswer],
}

impl<'a> Answers<'a> {
    fn body(self, reference: &str) -> Option<&'a Value> {
        let i = *self.at.get(reference)?;
        self.results.get(i).map(|answer| &answer.body)
    }
}

/// Looks up `ref.path[0].field` in earlier results.
fn lookup(expr: &str, outputs: Answers<'_>, failed: &[String]) -> Result<Value, String> {
    let (reference, path) = expr.split_once('.').unwrap_or((expr, ""));
    if failed.iter().any(|f| f == reference) {
        return Err(format!(
            "Execution halted as previous operation ({reference}) was not successful."
        ));
    }
    let invalid = || {
        format!(
            "Invalid reference specified. No value for {expr} found in {reference}. Provided \
             referenceId ({reference}) must start with a letter or a number, and it can contain \
             only letters, numbers and underscores ('_')."
        )
    };
    let mut current = outputs.body(reference).ok_or_else(invalid)?;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        current = current.get(name).ok_or_else(invalid)?;
        if let Some(index) = index {
            current = current.get(index).ok_or_else(invalid)?;
        }
    }
    if current.is_null() {
        return Err(invalid());
    }
    Ok(current.clone())
}

fn resolve_string(text: &str, outputs: Answers<'_>, failed: &[String]) -> Result<Value, String> {
    if let Some(inner) = text.strip_prefix("@{").and_then(|t| t.strip_suffix('}'))
        && !inner.contains('}')
    {
        return lookup(inner, outputs, failed);
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("@{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("Unterminated reference in {text}"))?;
        match lookup(&after[..end], outputs, failed)? {
            Value::String(s) => out.push_str(&s),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

/// Replaces every `@{reference.field}` inside `value` where it stands: the body is the node's
/// own copy, so only the strings that mention a reference are rebuilt (copying the whole tree
/// to change one or two of its strings was a twentieth of the emulator's time).
fn resolve_in_place(
    value: &mut Value,
    outputs: Answers<'_>,
    failed: &[String],
) -> Result<(), String> {
    match value {
        Value::String(s) if s.contains("@{") => {
            let resolved = resolve_string(s, outputs, failed)?;
            *value = resolved;
        }
        Value::Array(items) => {
            for item in items {
                resolve_in_place(item, outputs, failed)?;
            }
        }
        Value::Object(map) => {
            for item in map.values_mut() {
                resolve_in_place(item, outputs, failed)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// True when a string inside `value` holds a `@{reference.field}`.
fn mentions_reference(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains("@{"),
        Value::Array(items) => items.iter().any(mentions_reference),
        Value::Object(map) => map.values().any(mentions_reference),
        _ => false,
    }
}

/// The node's URL and body with every `@{reference.field}` replaced; a body that mentions none
/// (most of them) is used as it is, not copied.
fn resolve_all<'a>(
    url: &str,
    body: Option<&'a Body>,
    outputs: Answers<'_>,
    failed: &[String],
) -> Result<(String, Option<Cow<'a, Value>>), String> {
    let url = match resolve_string(url, outputs, failed)? {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let body = match body.map(Body::value) {
        Some(body) if mentions_reference(&body) => {
            let mut body = body.into_owned();
            resolve_in_place(&mut body, outputs, failed)?;
            Some(Cow::Owned(body))
        }
        body => body,
    };
    Ok((url, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(reference: &str, body: Value) -> NodeAnswer {
        NodeAnswer {
            body,
            http_headers: HttpHeaders::default(),
            http_status_code: 201,
            reference_id: reference.to_owned(),
        }
    }

    #[test]
    fn references_are_resolved_wherever_they_stand_in_a_body() {
        let results = [answer("lead", json!({"id": "00Q5g000000001AAA", "n": 7}))];
        let at = HashMap::from([("lead".to_owned(), 0)]);
        let outputs = Answers {
            at: &at,
            results: &results,
        };
        let body = Body::Tree(json!({
            "WhoId": "@{lead.id}",
            "Count": "@{lead.n}",
            "Nested": {"list": ["x @{lead.id} y", 3, null], "plain": "no reference"},
            "Plain": "text",
        }));
        let (url, resolved) = resolve_all("/x/@{lead.id}", Some(&body), outputs, &[]).unwrap();
        assert_eq!(url, "/x/00Q5g000000001AAA");
        assert_eq!(
            resolved.unwrap().into_owned(),
            json!({
                "WhoId": "00Q5g000000001AAA",
                "Count": 7,
                "Nested": {"list": ["x 00Q5g000000001AAA y", 3, null], "plain": "no reference"},
                "Plain": "text",
            })
        );
        // A body without a reference is used as it is.
        let plain = Body::Tree(json!({"Plain": "text"}));
        let (_, kept) = resolve_all("/x", Some(&plain), outputs, &[]).unwrap();
        assert!(matches!(kept, Some(Cow::Borrowed(_))));
        // The first reference that cannot resolve fails the node, with Salesforce's message.
        let missing = Body::Tree(json!({"A": {"B": ["@{missing.id}"]}}));
        let error = resolve_all("/x", Some(&missing), outputs, &[]).unwrap_err();
        assert!(
            error.starts_with("Invalid reference specified. No value for missing.id"),
            "{error}"
        );
        let halted = resolve_all("/x", Some(&body), outputs, &["lead".to_owned()]).unwrap_err();
        assert_eq!(
            halted,
            "Execution halted as previous operation (lead) was not successful."
        );
    }
}
