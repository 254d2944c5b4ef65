//! The field rules JSON Schema cannot say, as keywords of our own on a spec schema's
//! properties (at any depth of `properties`):
//!
//! | keyword | value | rule |
//! |---|---|---|
//! | `x-catalog` | a category (`flavor`) | the string names an entry of that catalog (`unknown_catalog_item`) |
//! | `x-catalog-range` | `{"entry": "/class", "min": "min_gb", "max": "max_gb"}` | the number lies within those attributes of the entry the field at `entry` names (`invalid_spec`) |
//! | `x-immutable` | `true` | the field cannot change after create (`immutable_field`) |
//! | `x-only-grows` | `true` or `"version"` | a change may not make it smaller (`invalid_spec`) |
//! | `x-reference` | `{"kind": "vm", "code": "invalid_attachment"}` | a UUID of a live resource of that kind in the same tenant and zone (`code`, default `invalid_reference`) |
//! | `x-quota` | `{"dimension": "nodes"}` or `{"catalog_attributes": ["vcpus"], "times": "/node_count"}` | what the resource consumes: the number itself, or attributes of the catalog entry it names (times another field) |

use super::{dotted, invalid_type, CatalogRange, Reference, ValidSpec};
use crate::domain::quota::{Amounts, Dimension};
use crate::domain::spec::{CatalogRef, Category};
use crate::domain::{Kind, ValidationError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// How a value is compared when it may only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Growth {
    /// As a number.
    Number,
    /// As dotted numbers (`1.9` < `1.10`).
    Version,
}

impl Growth {
    fn key(self, v: &Value) -> Option<Vec<f64>> {
        match self {
            Growth::Number => v.as_f64().map(|n| vec![n]),
            Growth::Version => v
                .as_str()
                .map(|s| s.split('.').map(|p| p.parse().unwrap_or(0.0)).collect()),
        }
    }

    /// Whether `new` is strictly larger than `old` (a missing `old` counts as smaller).
    pub fn grew(self, old: Option<&Value>, new: Option<&Value>) -> bool {
        match (old.and_then(|v| self.key(v)), new.and_then(|v| self.key(v))) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(o), Some(n)) => n.partial_cmp(&o) == Some(std::cmp::Ordering::Greater),
        }
    }

    /// Whether `new` is not smaller than `old`.
    fn kept_or_grew(self, old: Option<&Value>, new: Option<&Value>) -> bool {
        old == new || self.grew(old, new)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeDef {
    entry: String,
    #[serde(default)]
    min: Option<String>,
    #[serde(default)]
    max: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferenceDef {
    kind: Kind,
    #[serde(default)]
    code: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaDef {
    #[serde(default)]
    dimension: Option<Dimension>,
    #[serde(default)]
    catalog_attributes: Vec<Dimension>,
    #[serde(default)]
    times: Option<String>,
}

/// The rules of one field.
#[derive(Debug, Clone, Default)]
struct FieldRule {
    pointer: String,
    catalog: Option<Category>,
    range: Option<RangeDef>,
    immutable: bool,
    only_grows: Option<Growth>,
    reference: Option<ReferenceDef>,
    quota: Option<QuotaDef>,
}

/// The `x-` rules of a spec schema, by field.
#[derive(Debug, Clone, Default)]
pub struct FieldRules(Vec<FieldRule>);

/// The schema of the property at JSON pointer `pointer` (through `properties` only).
pub fn schema_at<'s>(schema: &'s Value, pointer: &str) -> Option<&'s Value> {
    pointer
        .split('/')
        .skip(1)
        .try_fold(schema, |s, segment| s.get("properties")?.get(segment))
}

/// Fills in the `default` of every missing property whose schema has one, at every
/// depth where the value is an object.
pub fn fill_defaults(schema: &Value, value: &mut Value) {
    let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object_mut(),
    ) else {
        return;
    };
    for (name, prop) in props {
        match obj.get_mut(name) {
            Some(v) => fill_defaults(prop, v),
            None => {
                if let Some(d) = prop.get("default") {
                    obj.insert(name.clone(), d.clone());
                }
            }
        }
    }
}

fn keyword<T: serde::de::DeserializeOwned>(
    prop: &Value,
    name: &str,
    at: &str,
) -> Result<Option<T>, ValidationError> {
    prop.get(name)
        .map(|v| {
            serde_json::from_value(v.clone())
                .map_err(|e| invalid_type(format!("spec_schema{}.{name}", at), e.to_string()))
        })
        .transpose()
}

impl FieldRules {
    /// Reads the rules of `schema` (the spec schema of `kind`), checking each keyword.
    pub fn parse(
        schema: &Value,
        kind: &Kind,
        known: &dyn Fn(&Kind) -> bool,
    ) -> Result<FieldRules, ValidationError> {
        let mut rules = Vec::new();
        walk(schema, String::new(), &mut rules)?;
        let out = FieldRules(rules);
        out.check(schema, kind, known)?;
        Ok(out)
    }

    fn check(
        &self,
        schema: &Value,
        kind: &Kind,
        known: &dyn Fn(&Kind) -> bool,
    ) -> Result<(), ValidationError> {
        for r in &self.0 {
            let at = format!("spec_schema{}", dotted("", &r.pointer));
            if let Some(range) = &r.range {
                let entry = self.0.iter().find(|e| e.pointer == range.entry);
                if entry.and_then(|e| e.catalog).is_none() {
                    return Err(invalid_type(
                        format!("{at}.x-catalog-range.entry"),
                        format!("{:?} is not a field with x-catalog", range.entry),
                    ));
                }
            }
            if let Some(reference) = &r.reference {
                let code_ok = reference.code.as_deref().is_none_or(|c| {
                    c.len() <= 64
                        && c.starts_with(|ch: char| ch.is_ascii_lowercase())
                        && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                });
                if !code_ok {
                    return Err(invalid_type(
                        format!("{at}.x-reference.code"),
                        "an error code is 1 to 64 of a-z and _, starting with a letter",
                    ));
                }
                if reference.kind != *kind && !known(&reference.kind) {
                    return Err(invalid_type(
                        format!("{at}.x-reference.kind"),
                        format!(
                            "no resource type {:?} is registered",
                            reference.kind.as_str()
                        ),
                    ));
                }
            }
            if let Some(times) = r.quota.as_ref().and_then(|q| q.times.as_ref()) {
                if schema_at(schema, times).is_none() {
                    return Err(invalid_type(
                        format!("{at}.x-quota.times"),
                        format!("{times:?} is not a property of the spec"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The kinds the spec may name.
    pub fn referenced_kinds(&self) -> impl Iterator<Item = &Kind> {
        self.0
            .iter()
            .filter_map(|r| r.reference.as_ref().map(|d| &d.kind))
    }

    /// The dimensions `x-quota` counts into.
    pub fn dimensions(&self) -> Vec<Dimension> {
        self.0
            .iter()
            .filter_map(|r| r.quota.as_ref())
            .flat_map(|q| {
                q.dimension
                    .into_iter()
                    .chain(q.catalog_attributes.iter().copied())
            })
            .collect()
    }

    /// Refuses a change from `before` to `after` that an `x-immutable` or
    /// `x-only-grows` forbids.
    pub fn check_change(&self, before: &Value, after: &Value) -> Result<(), ValidationError> {
        for r in &self.0 {
            let (old, new) = (before.pointer(&r.pointer), after.pointer(&r.pointer));
            let field = dotted("spec", &r.pointer);
            let pointer = format!("/spec{}", r.pointer);
            if r.immutable && old != new {
                let why = "cannot change after the resource is created";
                return Err(ValidationError::new("immutable_field", field, why).at(pointer));
            }
            if let Some(g) = r.only_grows {
                if !g.kept_or_grew(old, new) {
                    let why = format!("may only grow: {} is less than {}", show(new), show(old));
                    return Err(ValidationError::new("invalid_spec", field, why).at(pointer));
                }
            }
        }
        Ok(())
    }

    /// What a schema-valid spec asks the database to confirm.
    pub fn collect(&self, value: Value) -> Result<ValidSpec, ValidationError> {
        let mut valid = ValidSpec {
            value,
            catalog: Vec::new(),
            ranges: Vec::new(),
            references: Vec::new(),
        };
        for r in &self.0 {
            let Some(v) = valid.value.pointer(&r.pointer).filter(|v| !v.is_null()) else {
                continue;
            };
            let field = dotted("spec", &r.pointer);
            if let Some(q) = &r.quota {
                // What counts against a quota is a count: a fraction counted as nothing,
                // and a negative number failed the usage row's check (a 500).
                let own = q.dimension.is_some().then_some(r.pointer.as_str());
                for pointer in own.into_iter().chain(q.times.as_deref()) {
                    let counted = valid.value.pointer(pointer).filter(|v| !v.is_null());
                    if counted.is_some_and(|n| n.as_i64().is_none_or(|n| n < 0)) {
                        return Err(ValidationError::new(
                            "invalid_spec",
                            dotted("spec", pointer),
                            "counts against a quota: must be a whole number from 0 to 2^63 - 1",
                        )
                        .at(format!("/spec{pointer}")));
                    }
                }
            }
            if let (Some(category), Some(name)) = (r.catalog, v.as_str()) {
                valid.catalog.push(CatalogRef {
                    field: field.clone(),
                    category,
                    name: name.to_owned(),
                });
            }
            if let (Some(range), Some(n)) = (&r.range, v.as_f64()) {
                valid.ranges.push(CatalogRange {
                    field: field.clone(),
                    value: n,
                    entry_field: dotted("spec", &range.entry),
                    min: range.min.clone(),
                    max: range.max.clone(),
                });
            }
            if let Some(reference) = &r.reference {
                let code = reference.code.clone().unwrap_or("invalid_reference".into());
                let id = v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    ValidationError::new(code.clone(), field.clone(), "must be a resource ID")
                        .at(format!("/spec{}", r.pointer))
                })?;
                valid.references.push(Reference {
                    field,
                    kind: reference.kind.clone(),
                    id,
                    code,
                });
            }
        }
        Ok(valid)
    }

    /// What a resource with `spec` (a valid one: whole numbers as integers) consumes;
    /// `entries` holds the attributes of the
    /// catalog entries its spec names, by dotted field.
    pub fn footprint(&self, spec: &Value, entries: &BTreeMap<String, Value>) -> Amounts {
        let mut amounts = Amounts {
            count: 1,
            ..Amounts::default()
        };
        let number = |v: Option<&Value>| v.and_then(Value::as_i64).unwrap_or(0);
        for r in &self.0 {
            let Some(q) = &r.quota else { continue };
            let times = q.times.as_ref().map_or(1, |t| number(spec.pointer(t)));
            if let Some(d) = q.dimension {
                amounts.add(d, number(spec.pointer(&r.pointer)).saturating_mul(times));
            }
            let entry = entries.get(&dotted("spec", &r.pointer));
            for d in &q.catalog_attributes {
                let per_unit = number(entry.and_then(|e| e.get(d.as_str())));
                amounts.add(*d, per_unit.saturating_mul(times));
            }
        }
        amounts
    }
}

fn show(v: Option<&Value>) -> String {
    v.map_or("nothing".into(), Value::to_string)
}

/// Reads the rules of `schema`'s properties, recursively; `at` is the pointer of
/// `schema` itself.
fn walk(schema: &Value, at: String, out: &mut Vec<FieldRule>) -> Result<(), ValidationError> {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return Ok(());
    };
    for (name, prop) in props {
        let pointer = format!("{at}/{}", name.replace('~', "~0").replace('/', "~1"));
        let here = dotted("", &pointer);
        let catalog: Option<String> = keyword(prop, "x-catalog", &here)?;
        let catalog = catalog
            .map(|c| {
                Category::parse(&c).ok_or_else(|| {
                    invalid_type(
                        format!("spec_schema{here}.x-catalog"),
                        format!("no catalog category {c:?}"),
                    )
                })
            })
            .transpose()?;
        let only_grows = match prop.get("x-only-grows") {
            None | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(Growth::Number),
            Some(_) => keyword(prop, "x-only-grows", &here)?,
        };
        let rule = FieldRule {
            pointer: pointer.clone(),
            catalog,
            range: keyword(prop, "x-catalog-range", &here)?,
            immutable: keyword(prop, "x-immutable", &here)?.unwrap_or(false),
            only_grows,
            reference: keyword(prop, "x-reference", &here)?,
            quota: keyword(prop, "x-quota", &here)?,
        };
        out.push(rule);
        walk(prop, pointer, out)?;
    }
    Ok(())
}
