//! A tenant file's mapping as the console edits it ([`MappingModel`]), read from and written
//! back into the file's TOML with `toml_edit`, so the admin's comments, key order and layout
//! survive an edit; the line diff shown before a save; the atomic write that keeps the
//! previous version as `<file>.toml.bak`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, Value};

/// The records of a mapping, in order, as the editor shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MappingModel {
    /// The records, in graph order.
    pub records: Vec<RecordModel>,
}

/// One record of the mapping (a `[[records]]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordModel {
    /// `ref`.
    #[serde(rename = "ref")]
    pub reference: String,
    /// `sobject`.
    pub sobject: String,
    /// `for_each` (`attendees`), empty for none.
    #[serde(default)]
    pub for_each: String,
    /// `when`, empty for none.
    #[serde(default)]
    pub when: String,
    /// `upsert` or `delete`.
    #[serde(default = "upsert")]
    pub action: String,
    /// `external_id_field`.
    pub external_id_field: String,
    /// `external_id` (a template).
    pub external_id: String,
    /// `[records.fields]`, in file order.
    #[serde(default)]
    pub fields: Vec<FieldRow>,
}

fn upsert() -> String {
    "upsert".into()
}

/// One field row: a Salesforce field and its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldRow {
    /// The Salesforce field's API name.
    pub name: String,
    /// `text`: a string (a template, a plain text or an `@{ref.id}` reference);
    /// `constant`: a TOML number or boolean, written as such.
    pub kind: String,
    /// The text, or the constant as written (`42`, `true`).
    pub value: String,
}

/// A mapping that cannot be put into a file; names the record and field.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The running file does not parse as TOML.
    #[error("the tenant file does not parse: {0}")]
    Parse(String),
    /// A constant is neither a number nor a boolean.
    #[error(
        "record {record}, field {field}: {value:?} is not a number or true/false; make it a text value"
    )]
    Constant {
        /// Record ref.
        record: String,
        /// Field.
        field: String,
        /// What was given.
        value: String,
    },
}

fn text(table: &Table, key: &str) -> String {
    table
        .get(key)
        .and_then(Item::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The mapping of a tenant file's text.
pub fn read(source: &str) -> Result<MappingModel, FileError> {
    let doc: DocumentMut = source
        .parse()
        .map_err(|e: toml_edit::TomlError| FileError::Parse(e.to_string()))?;
    let records = doc
        .get("records")
        .and_then(Item::as_array_of_tables)
        .map(|tables| {
            tables
                .iter()
                .map(|table| RecordModel {
                    reference: text(table, "ref"),
                    sobject: text(table, "sobject"),
                    for_each: text(table, "for_each"),
                    when: text(table, "when"),
                    action: Some(text(table, "action"))
                        .filter(|a| !a.is_empty())
                        .unwrap_or_else(upsert),
                    external_id_field: text(table, "external_id_field"),
                    external_id: text(table, "external_id"),
                    fields: table
                        .get("fields")
                        .and_then(Item::as_table_like)
                        .map(|fields| {
                            fields
                                .iter()
                                .map(|(name, item)| match item.as_str() {
                                    Some(s) => FieldRow {
                                        name: name.to_owned(),
                                        kind: "text".into(),
                                        value: s.to_owned(),
                                    },
                                    None => FieldRow {
                                        name: name.to_owned(),
                                        kind: "constant".into(),
                                        value: item
                                            .as_value()
                                            .map(|v| v.clone().decorated("", "").to_string())
                                            .unwrap_or_default(),
                                    },
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(MappingModel { records })
}

/// Sets `key` to `value` in `table`, keeping the key's comments when it was there; an empty
/// value removes the key.
fn set(table: &mut Table, key: &str, value: &str) {
    if value.is_empty() {
        table.remove(key);
        return;
    }
    match table.get_mut(key).and_then(Item::as_value_mut) {
        Some(old) if old.as_str() == Some(value) => {}
        Some(old) => {
            let decor = old.decor().clone();
            *old = Value::from(value);
            *old.decor_mut() = decor;
        }
        None => {
            table.insert(key, toml_edit::value(value));
        }
    }
}

fn constant(record: &str, row: &FieldRow) -> Result<Value, FileError> {
    let raw = row.value.trim();
    let parsed = match raw {
        "true" => Some(Value::from(true)),
        "false" => Some(Value::from(false)),
        _ => raw.parse::<i64>().map(Value::from).ok().or_else(|| {
            raw.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(Value::from)
        }),
    };
    parsed.ok_or_else(|| FileError::Constant {
        record: record.to_owned(),
        field: row.name.clone(),
        value: row.value.clone(),
    })
}

/// True when two values mean the same, however they are written (a string as `"…"` or `"""…"""`).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_str(), b.as_str()) {
        (Some(a), Some(b)) => a == b,
        _ => a.clone().decorated("", "").to_string() == b.clone().decorated("", "").to_string(),
    }
}

/// `source` with its mapping replaced by `model`: records matched by `ref` keep their comments
/// and layout, so do unchanged field rows; the rest of the file is untouched.
pub fn write(source: &str, model: &MappingModel) -> Result<String, FileError> {
    let mut doc: DocumentMut = source
        .parse()
        .map_err(|e: toml_edit::TomlError| FileError::Parse(e.to_string()))?;
    let old = doc
        .get("records")
        .and_then(Item::as_array_of_tables)
        .cloned()
        .unwrap_or_default();
    let mut records = ArrayOfTables::new();
    for record in &model.records {
        let mut table = old
            .iter()
            .find(|t| t.get("ref").and_then(Item::as_str) == Some(record.reference.as_str()))
            .cloned()
            .unwrap_or_default();
        set(&mut table, "ref", &record.reference);
        set(&mut table, "sobject", &record.sobject);
        set(&mut table, "for_each", &record.for_each);
        set(&mut table, "when", &record.when);
        let action = if record.action == "delete" {
            "delete"
        } else if table.contains_key("action") {
            "upsert"
        } else {
            ""
        };
        set(&mut table, "action", action);
        set(&mut table, "external_id_field", &record.external_id_field);
        set(&mut table, "external_id", &record.external_id);
        let previous = table
            .get("fields")
            .and_then(Item::as_table)
            .cloned()
            .unwrap_or_default();
        let mut fields = Table::new();
        fields.set_implicit(false);
        *fields.decor_mut() = previous.decor().clone();
        for row in &record.fields {
            let value = if row.kind == "constant" {
                constant(&record.reference, row)?
            } else {
                Value::from(row.value.as_str())
            };
            match previous.get_key_value(&row.name) {
                Some((key, item)) if item.as_value().is_some_and(|old| same(old, &value)) => {
                    fields.insert_formatted(key, item.clone());
                }
                Some((key, item)) => {
                    let mut value = value;
                    if let Some(old) = item.as_value() {
                        *value.decor_mut() = old.decor().clone();
                    }
                    fields.insert_formatted(key, Item::Value(value));
                }
                None => {
                    fields.insert(&row.name, Item::Value(value));
                }
            }
        }
        if record.fields.is_empty() {
            table.remove("fields");
        } else {
            table.insert("fields", Item::Table(fields));
        }
        records.push(table);
    }
    doc.insert("records", Item::ArrayOfTables(records));
    Ok(doc.to_string())
}

/// A line diff of `running` → `proposed`: each line prefixed with `-`, `+` or a space.
pub fn diff(running: &str, proposed: &str) -> Vec<String> {
    let a: Vec<&str> = running.lines().collect();
    let b: Vec<&str> = proposed.lines().collect();
    // Longest common subsequence table; tenant files are a few hundred lines at most.
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!(" {}", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+{}", b[j]));
            j += 1;
        } else {
            out.push(format!("-{}", a[i]));
            i += 1;
        }
    }
    out
}

/// Why a tenant file cannot be written where it lives.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct WriteError {
    /// The file.
    pub path: PathBuf,
    /// The I/O error (read-only: a ConfigMap mount, permissions).
    pub source: std::io::Error,
}

impl WriteError {
    /// True when the directory cannot be written at all (read-only mount or permissions), so
    /// the admin has to apply the file some other way.
    pub fn read_only(&self) -> bool {
        matches!(
            self.source.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
        )
    }
}

/// Writes `text` to `path` atomically (a temporary file in the same directory, renamed over
/// it), keeping the previous version as `<path>.bak`.
pub fn save(path: &Path, text: &str) -> Result<(), WriteError> {
    let fail = |source| WriteError {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).map_err(fail)?;
    if path.exists() {
        std::fs::copy(path, path.with_extension("toml.bak")).map_err(fail)?;
    }
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACME: &str = include_str!("../../config/tenants/acme.toml");

    #[test]
    fn an_unchanged_model_writes_the_file_back_byte_for_byte() {
        let model = read(ACME).unwrap();
        assert_eq!(model.records.len(), 3);
        assert_eq!(model.records[0].fields[0].name, "LastName");
        assert_eq!(write(ACME, &model).unwrap(), ACME);
    }

    #[test]
    fn edits_keep_comments_and_order() {
        let mut model = read(ACME).unwrap();
        model.records[0].fields.push(FieldRow {
            name: "NumberOfEmployees".into(),
            kind: "constant".into(),
            value: "12".into(),
        });
        model.records[0].fields.retain(|f| f.name != "Title");
        let text = write(ACME, &model).unwrap();
        assert!(text.contains("for_each = \"attendees\"            # one Lead per attendee"));
        assert!(text.contains("NumberOfEmployees = 12"));
        assert!(!text.contains("Title = "));
        let lines = diff(ACME, &text);
        let changed: Vec<&String> = lines.iter().filter(|l| !l.starts_with(' ')).collect();
        assert_eq!(
            changed,
            [
                "-Title = \"{{ attendee.title }}\"",
                "+NumberOfEmployees = 12"
            ]
        );
        model.records[0].fields[0].kind = "constant".into();
        assert!(matches!(
            write(ACME, &model),
            Err(FileError::Constant { field, .. }) if field == "LastName"
        ));
    }

    #[test]
    fn save_is_atomic_and_keeps_the_previous_version() {
        let dir =
            std::env::temp_dir().join(format!("portals-crm-save-{:x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acme.toml");
        std::fs::write(&path, "old").unwrap();
        save(&path, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(
            std::fs::read_to_string(dir.join("acme.toml.bak")).unwrap(),
            "old"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
