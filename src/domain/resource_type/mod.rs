//! Resource types as data: what a kind's spec looks like, which service acts on it,
//! which actions it has and what each does to the spec.
//!
//! A [`TypeDef`] is what the platform team registers (`PUT /v1/resource-types/{kind}`):
//! a JSON Schema (2020-12) of the spec, with the field rules JSON Schema cannot say as
//! keywords of our own ([`rules`]), and the actions. [`ResourceType::compile`] checks a
//! definition and compiles its schemas once; [`ResourceType::validate_spec`] and
//! [`ResourceType::apply_action`] are then pure functions of their inputs, and
//! [`evolution::check`] decides whether a new version of a type may replace the old.
//! The four built-in kinds are definitions like any other, seeded by a migration.

pub mod evolution;
pub mod rules;

use super::quota::{Amounts, Dimension};
use super::spec::CatalogRef;
use super::{Action, Kind, Service, ValidationError};
use jsonschema::Validator;
use rules::{FieldRules, Growth};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;
use uuid::Uuid;

/// A resource type as registered: the registry's unit of change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypeDef {
    /// The kind's name, as resources, operations and events carry it (`loadbalancer`).
    #[schema(value_type = String, pattern = "^[a-z][a-z0-9_]{0,31}$", example = "loadbalancer")]
    pub kind: Kind,
    /// Its collection's URL segment (`load-balancers`): `/v1/tenants/{t}/{plural}`.
    #[schema(
        pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
        example = "load-balancers"
    )]
    pub plural: String,
    /// The service whose workers act on it; its operations go to `ops.{service}.{zone}`.
    #[schema(value_type = String, pattern = "^[a-z][a-z0-9_]{0,31}$", example = "network")]
    pub service: Service,
    /// Free text for humans.
    #[serde(default)]
    pub description: String,
    /// JSON Schema (2020-12) of the spec, with the `x-` keywords of `docs/RESOURCE_TYPES.md`.
    #[schema(value_type = Object)]
    pub spec_schema: Value,
    /// JSON Schema of the status workers report (documentation for clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub status_schema: Option<Value>,
    /// The kind's actions (`POST …/{id}/actions/{name}`), by name.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, ActionDef>)]
    pub actions: BTreeMap<Action, ActionDef>,
}

/// One action of a resource type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionDef {
    /// Free text for humans.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of the action's body; by default an empty object.
    #[serde(default = "no_input")]
    #[schema(value_type = Object)]
    pub input_schema: Value,
    /// A JSON merge patch (RFC 7386) of the spec. A value `{"$input": "/ptr"}` stands for
    /// the input at that JSON pointer (the key is left out when the input has none).
    /// Without a patch, or when it comes out empty, the action is imperative: the spec
    /// stays and the worker acts (a reboot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub patch: Option<Value>,
    /// Conditions on the resource's spec the action needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Requirement>,
}

fn no_input() -> Value {
    json!({"type": "object", "additionalProperties": false})
}

/// A condition an action needs: exactly one of `is_not`, `present` and `grows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    /// JSON pointer of the spec field the condition is about (`/power_state`).
    pub field: String,
    /// The field must not have this value now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_not: Option<Value>,
    /// The field must be set (`true`) or unset (`false`) now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// The action must make the field larger: `number`, or `version` (dotted numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grows: Option<Growth>,
    /// The error code when it does not hold: `invalid_state` (409, the default for
    /// `is_not` and `present`) or `invalid_spec` (422, the default for `grows`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub code: Option<RequirementCode>,
    /// The error message.
    pub message: String,
}

/// The error a broken [`Requirement`] answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequirementCode {
    /// `409`: the action does not fit the resource's state.
    InvalidState,
    /// `422`: the spec the action would make is refused.
    InvalidSpec,
}

impl RequirementCode {
    fn as_str(self) -> &'static str {
        match self {
            RequirementCode::InvalidState => "invalid_state",
            RequirementCode::InvalidSpec => "invalid_spec",
        }
    }
}

/// What an action does to the spec.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The desired spec becomes this (a new generation), before validation.
    NewSpec(Value),
    /// The spec stays; the worker acts imperatively (reboot, reinstall as is).
    Imperative,
}

/// A spec that passed every check that needs no database.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    /// The spec with defaults filled in, as stored.
    pub value: Value,
    /// Names to check against the catalog.
    pub catalog: Vec<CatalogRef>,
    /// Numbers to check against bounds in a catalog entry's attributes.
    pub ranges: Vec<CatalogRange>,
    /// Other resources it names, which must be live in the same tenant and zone.
    pub references: Vec<Reference>,
}

/// A number that must lie within a catalog entry's attributes (`x-catalog-range`).
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogRange {
    /// Dotted path of the number (`spec.size_gb`).
    pub field: String,
    /// Its value.
    pub value: f64,
    /// Dotted path of the field naming the catalog entry (`spec.class`).
    pub entry_field: String,
    /// The attribute holding the lower bound, if any.
    pub min: Option<String>,
    /// The attribute holding the upper bound, if any.
    pub max: Option<String>,
}

/// A resource a spec names (`x-reference`).
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// Dotted path of the field (`spec.attached_to`).
    pub field: String,
    /// The kind it must be.
    pub kind: Kind,
    /// The resource's ID.
    pub id: Uuid,
    /// The error code when it is not a live resource of that kind in the same tenant and
    /// zone.
    pub code: String,
}

/// A definition, checked, with its schemas compiled: what the registry keeps.
#[derive(Debug)]
pub struct ResourceType {
    /// The definition.
    pub def: TypeDef,
    /// Its version: 1 when registered, one more at each change.
    pub version: i64,
    spec: Validator,
    rules: FieldRules,
    actions: BTreeMap<Action, Validator>,
}

/// A pattern every plural matches: a DNS label.
pub const PLURAL_PATTERN: &str = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$";

/// Segments under `/v1/tenants/{t}/` that are not resource collections (the routes of
/// `api`, and a few kept for the API's own use).
const RESERVED_PLURALS: &[&str] = &[
    "events",
    "keys",
    "quotas",
    "audit",
    "webhooks",
    "operations",
    "resource-types",
];

fn invalid_type(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError::new("invalid_resource_type", field, message)
}

/// Compiles a JSON Schema (2020-12, formats checked, no remote references).
fn compile_schema(schema: &Value, field: &str) -> Result<Validator, ValidationError> {
    if !schema.is_object() {
        return Err(invalid_type(field, "must be a JSON Schema object"));
    }
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| invalid_type(field, format!("not a valid JSON Schema 2020-12: {e}")))
}

/// A JSON pointer as the dotted path errors name (`/a/0/b` under `spec`: `spec.a[0].b`).
pub fn dotted(root: &str, pointer: &str) -> String {
    let mut out = root.to_owned();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            out.push('.');
            out.push_str(&segment);
        }
    }
    out
}

/// The first error `validator` finds in `value`, as a [`ValidationError`] with `code`
/// at the dotted path under `root`.
fn schema_error(
    validator: &Validator,
    value: &Value,
    code: &'static str,
    root: &str,
) -> Result<(), ValidationError> {
    match validator.iter_errors(value).next() {
        None => Ok(()),
        Some(e) => {
            let pointer = e.instance_path().as_str().to_owned();
            let message = e.to_string();
            Err(ValidationError::new(code, dotted(root, &pointer), message)
                .at(format!("/{root}{pointer}")))
        }
    }
}

impl ResourceType {
    /// Checks `def` and compiles its schemas. `known` says whether a kind other than
    /// `def.kind` is registered (for `x-reference`).
    pub fn compile(
        def: TypeDef,
        version: i64,
        known: &dyn Fn(&Kind) -> bool,
    ) -> Result<ResourceType, ValidationError> {
        let plural_ok = super::names::validate_label("plural", &def.plural).is_ok()
            && def.plural.starts_with(|c: char| c.is_ascii_lowercase())
            && !RESERVED_PLURALS.contains(&def.plural.as_str());
        if !plural_ok {
            return Err(invalid_type(
                "plural",
                format!(
                    "{:?} must be a DNS label (a-z, 0-9, -) and not one of {}",
                    def.plural,
                    RESERVED_PLURALS.join(", ")
                ),
            ));
        }
        let spec = compile_schema(&def.spec_schema, "spec_schema")?;
        if def.spec_schema.get("type") != Some(&json!("object")) {
            return Err(invalid_type(
                "spec_schema.type",
                "a spec is an object: the schema must say \"type\": \"object\"",
            ));
        }
        if let Some(status) = &def.status_schema {
            compile_schema(status, "status_schema")?;
        }
        let rules = FieldRules::parse(&def.spec_schema, &def.kind, known)?;
        let mut actions = BTreeMap::new();
        for (name, action) in &def.actions {
            let field = format!("actions.{name}");
            if name.is_core() {
                return Err(invalid_type(
                    field,
                    "create, update and delete are every kind's; an action needs another name",
                ));
            }
            let input = compile_schema(&action.input_schema, &format!("{field}.input_schema"))?;
            check_action(action, &field, &def.spec_schema)?;
            actions.insert(name.clone(), input);
        }
        Ok(ResourceType {
            def,
            version,
            spec,
            rules,
            actions,
        })
    }

    /// The kind.
    pub fn kind(&self) -> &Kind {
        &self.def.kind
    }

    /// The service whose workers act on it.
    pub fn service(&self) -> &Service {
        &self.def.service
    }

    /// The kinds its specs may name (`x-reference`).
    pub fn referenced_kinds(&self) -> impl Iterator<Item = &Kind> {
        self.rules.referenced_kinds()
    }

    /// The quota dimensions its resources can consume.
    pub fn dimensions(&self) -> Vec<Dimension> {
        let mut all = vec![Dimension::Count];
        all.extend(self.rules.dimensions());
        all.sort();
        all.dedup();
        all
    }

    /// Checks `spec` (a create's, or the next spec of an update of a resource whose spec
    /// is `before`): defaults filled in, then the schema, then the field rules.
    pub fn validate_spec(
        &self,
        spec: &Value,
        before: Option<&Value>,
    ) -> Result<ValidSpec, ValidationError> {
        let mut value = spec.clone();
        rules::fill_defaults(&self.def.spec_schema, &mut value);
        integral_numbers(&mut value);
        schema_error(&self.spec, &value, "invalid_spec", "spec")?;
        if let Some(before) = before {
            self.rules.check_change(before, &value)?;
        }
        self.rules.collect(value)
    }

    /// What action `name` with `input` does to a resource whose spec is `spec`; `None`
    /// when the kind has no such action.
    pub fn apply_action(
        &self,
        name: &Action,
        spec: &Value,
        input: &Value,
    ) -> Option<Result<Effect, ValidationError>> {
        let def = self.def.actions.get(name)?;
        let validator = self.actions.get(name)?;
        // An absent body is an empty object.
        let input = if input.is_null() {
            json!({})
        } else {
            input.clone()
        };
        Some(
            schema_error(validator, &input, "invalid_body", "input")
                .and_then(|()| run_action(def, spec, &input)),
        )
    }

    /// Whether the kind has action `name`.
    pub fn has_action(&self, name: &Action) -> bool {
        self.def.actions.contains_key(name)
    }

    /// What a resource with the valid spec `spec` consumes, given the attributes of the
    /// catalog entries its spec names (by dotted field).
    pub fn footprint(&self, spec: &Value, entries: &BTreeMap<String, Value>) -> Amounts {
        self.rules.footprint(spec, entries)
    }
}

/// Checks an action's patch and requirements when the type is registered.
fn check_action(
    action: &ActionDef,
    field: &str,
    spec_schema: &Value,
) -> Result<(), ValidationError> {
    if let Some(patch) = &action.patch {
        if !patch.is_object() {
            return Err(invalid_type(
                format!("{field}.patch"),
                "a patch is a JSON object (a merge patch of the spec)",
            ));
        }
    }
    for (i, r) in action.requires.iter().enumerate() {
        let at = format!("{field}.requires[{i}]");
        let tests = [r.is_not.is_some(), r.present.is_some(), r.grows.is_some()];
        if tests.iter().filter(|t| **t).count() != 1 {
            return Err(invalid_type(
                at,
                "needs exactly one of is_not, present and grows",
            ));
        }
        if !r.field.starts_with('/') || rules::schema_at(spec_schema, &r.field).is_none() {
            return Err(invalid_type(
                format!("{at}.field"),
                format!(
                    "{:?} is not a JSON pointer to a property of the spec",
                    r.field
                ),
            ));
        }
    }
    Ok(())
}

/// Substitutes `{"$input": "/ptr"}` in a patch template; keys whose input is absent go.
fn fill_template(template: &Value, input: &Value) -> Option<Value> {
    match template {
        Value::Object(map) => {
            if let (1, Some(Value::String(ptr))) = (map.len(), map.get("$input")) {
                return input.pointer(ptr).cloned();
            }
            let out: Map<String, Value> = map
                .iter()
                .filter_map(|(k, v)| fill_template(v, input).map(|v| (k.clone(), v)))
                .collect();
            Some(Value::Object(out))
        }
        other => Some(other.clone()),
    }
}

fn requirement_error(r: &Requirement, default: RequirementCode) -> ValidationError {
    let code = r.code.unwrap_or(default).as_str();
    ValidationError::new(code, dotted("spec", &r.field), r.message.clone())
        .at(format!("/spec{}", r.field))
}

/// Runs an action whose input is valid.
fn run_action(def: &ActionDef, spec: &Value, input: &Value) -> Result<Effect, ValidationError> {
    for r in &def.requires {
        let now = spec.pointer(&r.field).filter(|v| !v.is_null());
        let holds = match (&r.is_not, r.present) {
            (Some(value), _) => now != Some(value),
            (None, Some(present)) => now.is_some() == present,
            (None, None) => true,
        };
        if !holds {
            return Err(requirement_error(r, RequirementCode::InvalidState));
        }
    }
    let patch = def.patch.as_ref().and_then(|p| fill_template(p, input));
    let next = match patch {
        Some(Value::Object(p)) if !p.is_empty() => merge_patch(spec, &Value::Object(p)),
        _ => return Ok(Effect::Imperative),
    };
    for r in &def.requires {
        if let Some(growth) = r.grows {
            let (old, new) = (spec.pointer(&r.field), next.pointer(&r.field));
            if !growth.grew(old, new) {
                return Err(requirement_error(r, RequirementCode::InvalidSpec));
            }
        }
    }
    Ok(Effect::NewSpec(next))
}

/// Numbers with no fraction written as decimals (`50.0`, `1e3`) as the integers they
/// are, in place: JSON Schema's `integer` accepts them, and what comes after (quotas,
/// comparisons, the stored spec) reads integers as integers. The API reads every body
/// so, and [`ResourceType::validate_spec`] every spec (one stored before may hold `50.0`).
pub fn integral_numbers(v: &mut Value) {
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            let whole = n
                .as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64);
            if let Some(f) = whole {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(map) => map.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

/// Applies an RFC 7386 JSON merge patch: objects merge recursively, `null` removes a
/// key, anything else replaces. (Small enough to write here rather than add a crate.)
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            let mut out = t.clone();
            for (k, v) in p {
                if v.is_null() {
                    out.remove(k);
                } else {
                    let merged = merge_patch(t.get(k).unwrap_or(&Value::Null), v);
                    out.insert(k.clone(), merged);
                }
            }
            Value::Object(out)
        }
        (_, Value::Object(p)) => merge_patch(&json!({}), &Value::Object(p.clone())),
        (_, p) => p.clone(),
    }
}

#[cfg(test)]
mod tests;
