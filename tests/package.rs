//! The installable package (deploy/salesforce, namespace `BookMe`), the emulator's demo org and
//! the shipped mappings (config/tenants) agree: every field a mapping writes exists in the
//! package and the demo org with the same type and length, the permission set grants exactly
//! what the mappings need (relations included) and the version guard is the same rule. Drift in
//! any of the three fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use portals_crm::config::tenant::TenantConfig;
use portals_crm::config::{Action, Parent};
use portals_crm::emulator::org::{OrgSpec, SObjectSpec};

const NAMESPACE: &str = "BookMe__";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn source_dir() -> PathBuf {
    root().join("deploy/salesforce/force-app/main/default")
}

/// The text of every `<tag>…</tag>` in `xml`, in order. The package's metadata files are flat,
/// attribute-free Metadata API XML, so a tag scan reads them; entities are decoded.
fn elements(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let end = after
            .find(&close)
            .unwrap_or_else(|| panic!("<{tag}> is not closed"));
        found.push(
            after[..end]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&"),
        );
        rest = &after[end + close.len()..];
    }
    found
}

fn element(xml: &str, tag: &str) -> Option<String> {
    elements(xml, tag).into_iter().next()
}

/// A name as the package source spells it: without the namespace prefix.
fn source_name(installed: &str) -> &str {
    installed.strip_prefix(NAMESPACE).unwrap_or(installed)
}

/// The folder of an object's custom fields in the source: Event's are Activity fields.
fn source_object(installed: &str) -> &str {
    match installed {
        "Event" | "Task" => "Activity",
        other => source_name(other),
    }
}

/// The shipped tenants' mappings.
fn mappings() -> Vec<TenantConfig> {
    let dir = root().join("config/tenants");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no tenant files in {}", dir.display());
    files
        .iter()
        .map(|p| TenantConfig::load(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// (sObject, field) pairs the mappings write, installed names.
fn written_fields(tenants: &[TenantConfig]) -> BTreeSet<(String, String)> {
    let mut written = BTreeSet::new();
    for tenant in tenants {
        for record in &tenant.records {
            if record.action == Action::Delete {
                continue;
            }
            written.insert((record.sobject.clone(), record.external_id_field.clone()));
            for field in record.fields.keys() {
                written.insert((record.sobject.clone(), field.clone()));
            }
        }
    }
    written
}

fn demo_object<'a>(org: &'a OrgSpec, name: &str) -> &'a SObjectSpec {
    org.sobjects
        .iter()
        .find(|o| o.name == name)
        .unwrap_or_else(|| panic!("the demo org has no {name}"))
}

/// The demo org's field type for a package field's Metadata API type, and whether length counts.
fn describe_type(metadata_type: &str) -> (&'static str, bool) {
    match metadata_type {
        "Text" => ("string", true),
        "Number" => ("double", false),
        "DateTime" => ("datetime", false),
        "Picklist" => ("picklist", false),
        "Lookup" => ("reference", false),
        "Email" => ("email", true),
        other => panic!("no describe type known for metadata type {other}"),
    }
}

#[test]
fn every_mapped_field_exists_in_the_package_and_the_demo_org_alike() {
    let org = OrgSpec::demo();
    let tenants = mappings();
    for (sobject, field) in written_fields(&tenants) {
        let object = demo_object(&org, &sobject);
        let spec = object
            .fields
            .iter()
            .find(|f| f.name == field)
            .unwrap_or_else(|| panic!("{sobject}.{field} is mapped but not in the demo org"));
        assert!(
            spec.createable && spec.updateable,
            "{sobject}.{field} not writable in the demo org"
        );
        if !field.ends_with("__c") {
            continue;
        }
        assert!(
            field.starts_with(NAMESPACE),
            "{sobject}.{field} is not the package's"
        );
        let path = source_dir().join(format!(
            "objects/{}/fields/{}.field-meta.xml",
            source_object(&sobject),
            source_name(&field)
        ));
        let xml = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "{sobject}.{field} is mapped but the package lacks {}",
                path.display()
            )
        });
        assert_eq!(
            element(&xml, "fullName").as_deref(),
            Some(source_name(&field))
        );
        let metadata_type = element(&xml, "type").expect("a field has a type");
        let (describe, has_length) = describe_type(&metadata_type);
        assert_eq!(
            spec.field_type, describe,
            "{sobject}.{field}: package {metadata_type}, demo org {}",
            spec.field_type
        );
        if has_length {
            let length: u32 = element(&xml, "length")
                .expect("a text field has a length")
                .parse()
                .unwrap();
            assert_eq!(spec.length, length, "{sobject}.{field}: length");
        }
        let external_id = element(&xml, "externalId").as_deref() == Some("true");
        assert_eq!(
            spec.external_id, external_id,
            "{sobject}.{field}: externalId"
        );
        let required = element(&xml, "required").as_deref() == Some("true");
        assert_eq!(!spec.nillable, required, "{sobject}.{field}: required");
        if metadata_type == "Picklist" {
            let values = elements(&xml, "value")
                .iter()
                .map(|v| element(v, "fullName").unwrap())
                .collect::<Vec<_>>();
            assert_eq!(spec.picklist, values, "{sobject}.{field}: picklist values");
            let restricted = element(&xml, "restricted").as_deref() == Some("true");
            assert_eq!(spec.restricted, restricted, "{sobject}.{field}: restricted");
        }
        if metadata_type == "Lookup" {
            let target = element(&xml, "referenceTo").unwrap();
            assert_eq!(
                spec.reference_to,
                vec![target],
                "{sobject}.{field}: referenceTo"
            );
        }
    }
}

/// The fields a permission set must grant Edit on: the mapped ones under field-level security
/// (required fields, owner fields and external-id keys that are required are always editable).
fn fls_fields(org: &OrgSpec, tenants: &[TenantConfig]) -> BTreeSet<String> {
    written_fields(tenants)
        .into_iter()
        .filter(|(sobject, field)| {
            let object = demo_object(org, sobject);
            object.fields.iter().any(|f| &f.name == field && f.nillable)
        })
        .map(|(sobject, field)| format!("{sobject}.{field}"))
        // A parent relation (IsParent) makes the attendee the Event's Who: it sets WhoId.
        .chain(
            tenants
                .iter()
                .filter(|t| {
                    t.relations
                        .as_ref()
                        .is_some_and(|r| r.parent == Parent::First)
                })
                .map(|_| "Event.WhoId".to_owned()),
        )
        .collect()
}

/// Object access the mappings need, installed names → CRUD letters. Event access comes from
/// the Edit Events user permission, which EventRelation (relations) follows.
fn needed_objects(tenants: &[TenantConfig]) -> BTreeMap<String, String> {
    let mut needed = BTreeMap::new();
    for tenant in tenants {
        for record in &tenant.records {
            let letters = if record.action == Action::Delete {
                "CRUD"
            } else {
                "CRU"
            };
            let entry = needed
                .entry(record.sobject.clone())
                .or_insert_with(String::new);
            if letters.len() > entry.len() {
                *entry = letters.to_owned();
            }
        }
        // Events have no object permissions: "Edit Events" creates, edits and deletes them,
        // and EventRelation follows it (a relation dropped in a newer version is deleted).
        if needed.contains_key("Event") || tenant.relations.is_some() {
            needed.insert("Event".to_owned(), "CRUD".to_owned());
        }
    }
    needed
}

#[test]
fn the_permission_set_is_exactly_what_the_mappings_need_in_package_and_demo_org() {
    let org = OrgSpec::demo();
    let tenants = mappings();
    let fls = fls_fields(&org, &tenants);
    let needed = needed_objects(&tenants);

    let xml = std::fs::read_to_string(
        source_dir().join("permissionsets/BookMe_Integration_User.permissionset-meta.xml"),
    )
    .unwrap();
    let package_fields: BTreeSet<String> = elements(&xml, "fieldPermissions")
        .iter()
        .map(|block| {
            assert_eq!(
                element(block, "editable").as_deref(),
                Some("true"),
                "{block}"
            );
            let field = element(block, "field").unwrap();
            let (object, name) = field.split_once('.').unwrap();
            let object = match object {
                "Lead" | "Event" => object.to_owned(),
                custom => format!("{NAMESPACE}{custom}"),
            };
            let name = if name.ends_with("__c") {
                format!("{NAMESPACE}{name}")
            } else {
                name.to_owned()
            };
            format!("{object}.{name}")
        })
        .collect();
    assert_eq!(
        package_fields, fls,
        "package field permissions vs the mappings"
    );

    let package_objects: BTreeMap<String, String> = elements(&xml, "objectPermissions")
        .iter()
        .map(|block| {
            let object = element(block, "object").unwrap();
            let object = if object.ends_with("__c") {
                format!("{NAMESPACE}{object}")
            } else {
                object
            };
            let flag = |tag: &str| element(block, tag).as_deref() == Some("true");
            assert!(
                !flag("viewAllRecords") && !flag("modifyAllRecords"),
                "{object}: View/Modify All"
            );
            let letters: String = [
                ("allowCreate", 'C'),
                ("allowRead", 'R'),
                ("allowEdit", 'U'),
                ("allowDelete", 'D'),
            ]
            .iter()
            .filter(|(tag, _)| flag(tag))
            .map(|(_, letter)| *letter)
            .collect();
            (object, letters)
        })
        .collect();
    let mut without_event = needed.clone();
    let event = without_event.remove("Event");
    assert_eq!(
        package_objects, without_event,
        "package object permissions vs the mappings"
    );
    let user_permissions: BTreeSet<String> = elements(&xml, "userPermissions")
        .iter()
        .filter(|b| element(b, "enabled").as_deref() == Some("true"))
        .map(|b| element(b, "name").unwrap())
        .collect();
    let mut expected_user: BTreeSet<String> = ["ApiEnabled".to_owned()].into();
    if event.is_some() {
        expected_user.insert("EditEvent".to_owned());
    }
    assert_eq!(user_permissions, expected_user, "package user permissions");

    let demo = org
        .permission_sets
        .iter()
        .find(|p| p.name == "BookMe_Integration_User")
        .expect("the demo org has the package's permission set");
    let demo_fields: BTreeSet<String> = demo
        .field_permissions()
        .iter()
        .filter(|(name, _)| !name.starts_with("user."))
        .map(|(name, access)| {
            assert_eq!(access, "edit", "{name}");
            name.clone()
        })
        .collect();
    // The emulator keeps field permission keys in lower case (API names are case-insensitive).
    let fls_keys: BTreeSet<String> = fls.iter().map(|name| name.to_ascii_lowercase()).collect();
    assert_eq!(
        demo_fields, fls_keys,
        "demo org field permissions vs the mappings"
    );
    let mut demo_objects = demo.objects.clone();
    assert_eq!(
        demo_objects.remove("User").as_deref(),
        Some("R"),
        "User read (standard for every user)"
    );
    assert_eq!(
        demo_objects, needed,
        "demo org object permissions vs the mappings"
    );
}

#[test]
fn the_version_guard_is_the_same_rule_in_package_and_demo_org() {
    let org = OrgSpec::demo();
    let path = source_dir().join("objects/Booking__c/validationRules");
    let files: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one validation rule in {}", path.display());
    let xml = std::fs::read_to_string(&files[0]).unwrap();
    let name = element(&xml, "fullName").unwrap();
    assert_eq!(element(&xml, "active").as_deref(), Some("true"));
    let rule = org
        .validation_rules
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("the demo org lacks the rule {name}"));
    assert_eq!(rule.sobject, format!("{NAMESPACE}Booking__c"));
    assert_eq!(
        element(&xml, "errorMessage").as_deref(),
        Some(rule.error_message.as_str())
    );
    let field = source_name(&rule.no_decrease);
    assert_eq!(
        element(&xml, "errorConditionFormula").as_deref(),
        Some(format!("AND(NOT(ISNEW()), {field} < PRIORVALUE({field}))").as_str())
    );
    // Every shipped mapping writes the guarded field on that object, so the guard sees each version.
    for tenant in mappings() {
        assert!(
            tenant
                .records
                .iter()
                .any(|r| r.sobject == rule.sobject && r.fields.contains_key(&rule.no_decrease)),
            "tenant {} does not write {}.{}",
            tenant.tenant,
            rule.sobject,
            rule.no_decrease
        );
    }
}

#[test]
fn the_tag_scan_reads_nested_and_escaped_elements() {
    let xml = "<a><b>1</b><b>x &lt; y</b></a>";
    assert_eq!(elements(xml, "b"), vec!["1", "x < y"]);
    assert_eq!(element(xml, "c"), None);
    assert!(Path::new(&source_dir()).is_dir());
}
