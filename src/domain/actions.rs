//! Resource actions and spec patches: each turns the current spec into the next desired
//! spec (or leaves it, for imperative actions like `reboot`). The result is validated
//! like any spec, so an action can never store a spec a create would refuse.

use super::spec::{BmPower, VmPower};
use super::{Action, Kind, ValidationError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

/// What an action does to the spec.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The desired spec becomes this (a new generation).
    NewSpec(Value),
    /// The spec stays; the worker acts imperatively (reboot, reinstall as is).
    Imperative,
}

/// The actions each kind supports, as they appear in URLs.
pub fn supported(kind: Kind) -> &'static [Action] {
    match kind {
        Kind::Vm => &[Action::Start, Action::Stop, Action::Reboot, Action::Resize],
        Kind::Bm => &[Action::PowerOn, Action::PowerOff, Action::Reprovision],
        Kind::Cluster => &[Action::Scale, Action::Upgrade],
        Kind::Volume => &[Action::Resize, Action::Attach, Action::Detach],
    }
}

/// Parses an action's path segment for `kind`; `None` if `kind` has no such action.
pub fn parse(kind: Kind, segment: &str) -> Option<Action> {
    let action: Action = segment.parse().ok()?;
    supported(kind).contains(&action).then_some(action)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoInput {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlavorInput {
    flavor: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SizeInput {
    size_gb: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeCountInput {
    node_count: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionInput {
    version: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageInput {
    #[serde(default)]
    image: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachInput {
    vm_id: Uuid,
}

fn input<T: DeserializeOwned>(value: &Value) -> Result<T, ValidationError> {
    // An absent body is an empty object.
    let value = if value.is_null() {
        json!({})
    } else {
        value.clone()
    };
    serde_json::from_value(value)
        .map_err(|e| ValidationError::new("invalid_body", "input", e.to_string()))
}

fn with(spec: &Value, field: &str, value: Value) -> Effect {
    let mut next = spec.clone();
    next[field] = value;
    Effect::NewSpec(next)
}

/// Numeric comparison of dotted versions (`1.9` < `1.10`).
fn version_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// What `action` with `body` does to a resource of `kind` whose spec is `spec`.
pub fn apply(
    kind: Kind,
    action: Action,
    spec: &Value,
    body: &Value,
) -> Result<Effect, ValidationError> {
    let effect = match kind {
        Kind::Vm => vm(action, spec, body)?,
        Kind::Bm => bare_metal(action, spec, body)?,
        Kind::Cluster => cluster(action, spec, body)?,
        Kind::Volume => volume(action, spec, body)?,
    };
    effect.ok_or_else(|| {
        ValidationError::new(
            "unknown_action",
            "action",
            format!("a {kind} has no action {action}"),
        )
    })
}

/// The spec's `field`, or `null`.
fn current(spec: &Value, field: &str) -> Value {
    spec.get(field).cloned().unwrap_or(Value::Null)
}

/// A VM's actions; `None` for an action VMs do not have.
fn vm(action: Action, spec: &Value, body: &Value) -> Result<Option<Effect>, ValidationError> {
    Ok(Some(match action {
        Action::Start => {
            input::<NoInput>(body)?;
            with(spec, "power_state", json!(VmPower::Running))
        }
        Action::Stop => {
            input::<NoInput>(body)?;
            with(spec, "power_state", json!(VmPower::Stopped))
        }
        Action::Reboot => {
            input::<NoInput>(body)?;
            if current(spec, "power_state") == json!(VmPower::Stopped) {
                return Err(ValidationError::new(
                    "invalid_state",
                    "power_state",
                    "a stopped VM cannot be rebooted; start it",
                ));
            }
            Effect::Imperative
        }
        Action::Resize => with(spec, "flavor", json!(input::<FlavorInput>(body)?.flavor)),
        _ => return Ok(None),
    }))
}

/// A bare-metal server's actions; `None` for an action it does not have.
fn bare_metal(
    action: Action,
    spec: &Value,
    body: &Value,
) -> Result<Option<Effect>, ValidationError> {
    Ok(Some(match action {
        Action::PowerOn => {
            input::<NoInput>(body)?;
            with(spec, "power_state", json!(BmPower::On))
        }
        Action::PowerOff => {
            input::<NoInput>(body)?;
            with(spec, "power_state", json!(BmPower::Off))
        }
        Action::Reprovision => match input::<ImageInput>(body)?.image {
            Some(image) => with(spec, "image", json!(image)),
            None => Effect::Imperative,
        },
        _ => return Ok(None),
    }))
}

/// A cluster's actions; `None` for an action clusters do not have.
fn cluster(action: Action, spec: &Value, body: &Value) -> Result<Option<Effect>, ValidationError> {
    Ok(Some(match action {
        Action::Scale => with(
            spec,
            "node_count",
            json!(input::<NodeCountInput>(body)?.node_count),
        ),
        Action::Upgrade => {
            let version = input::<VersionInput>(body)?.version;
            let from = current(spec, "version");
            if version_key(&version) <= version_key(from.as_str().unwrap_or("")) {
                return Err(ValidationError::new(
                    "invalid_spec",
                    "version",
                    format!("upgrade must move to a newer version than {from}"),
                ));
            }
            with(spec, "version", json!(version))
        }
        _ => return Ok(None),
    }))
}

/// A volume's actions; `None` for an action volumes do not have.
fn volume(action: Action, spec: &Value, body: &Value) -> Result<Option<Effect>, ValidationError> {
    Ok(Some(match action {
        Action::Resize => {
            let size = input::<SizeInput>(body)?.size_gb;
            let now = current(spec, "size_gb");
            if u64::from(size) <= now.as_u64().unwrap_or(0) {
                return Err(ValidationError::new(
                    "invalid_spec",
                    "size_gb",
                    format!("volumes only grow: {size} GB is not more than {now} GB"),
                ));
            }
            with(spec, "size_gb", json!(size))
        }
        Action::Attach => attach(spec, input::<AttachInput>(body)?.vm_id)?,
        Action::Detach => {
            input::<NoInput>(body)?;
            if current(spec, "attached_to").is_null() {
                return Err(ValidationError::new(
                    "invalid_state",
                    "attached_to",
                    "the volume is not attached",
                ));
            }
            let mut next = spec.clone();
            if let Some(o) = next.as_object_mut() {
                o.remove("attached_to");
            }
            Effect::NewSpec(next)
        }
        _ => return Ok(None),
    }))
}

/// Attaching a volume whose spec is `spec` to `vm`.
fn attach(spec: &Value, vm: Uuid) -> Result<Effect, ValidationError> {
    match current(spec, "attached_to") {
        Value::Null => Ok(with(spec, "attached_to", json!(vm))),
        v if v == json!(vm) => Err(ValidationError::new(
            "invalid_state",
            "vm_id",
            "already attached to this VM",
        )),
        v => Err(ValidationError::new(
            "invalid_state",
            "vm_id",
            format!("attached to {v}; detach it first"),
        )),
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
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        let patch = json!({"a": "z", "c": {"f": null}});
        assert_eq!(
            merge_patch(&target, &patch),
            json!({"a": "z", "c": {"d": "e"}})
        );
        assert_eq!(merge_patch(&json!({"a": 1}), &json!([1])), json!([1]));
        assert_eq!(merge_patch(&json!("x"), &json!({"a": null})), json!({}));
    }

    #[test]
    fn actions_change_the_spec_they_are_about() {
        let vm = json!({"flavor": "m1.small", "image": "debian-12", "power_state": "running"});
        assert_eq!(
            apply(Kind::Vm, Action::Stop, &vm, &Value::Null).unwrap(),
            Effect::NewSpec(
                json!({"flavor": "m1.small", "image": "debian-12", "power_state": "stopped"})
            )
        );
        assert_eq!(
            apply(Kind::Vm, Action::Reboot, &vm, &json!({})).unwrap(),
            Effect::Imperative
        );
        let Effect::NewSpec(s) = apply(
            Kind::Vm,
            Action::Resize,
            &vm,
            &json!({"flavor": "m1.large"}),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(s["flavor"], "m1.large");
    }

    #[test]
    fn volumes_only_grow_and_attach_once() {
        let vol = json!({"size_gb": 20, "class": "ssd"});
        assert_eq!(
            apply(Kind::Volume, Action::Resize, &vol, &json!({"size_gb": 20}))
                .unwrap_err()
                .code,
            "invalid_spec"
        );
        assert!(apply(Kind::Volume, Action::Resize, &vol, &json!({"size_gb": 21})).is_ok());
        let vm = Uuid::now_v7();
        let Effect::NewSpec(attached) =
            apply(Kind::Volume, Action::Attach, &vol, &json!({"vm_id": vm})).unwrap()
        else {
            panic!()
        };
        let again = apply(
            Kind::Volume,
            Action::Attach,
            &attached,
            &json!({"vm_id": Uuid::now_v7()}),
        );
        assert_eq!(again.unwrap_err().code, "invalid_state");
        assert_eq!(
            apply(Kind::Volume, Action::Detach, &vol, &json!({}))
                .unwrap_err()
                .code,
            "invalid_state"
        );
        let Effect::NewSpec(detached) =
            apply(Kind::Volume, Action::Detach, &attached, &json!({})).unwrap()
        else {
            panic!()
        };
        assert_eq!(detached, vol);
    }

    #[test]
    fn upgrades_only_go_forward_and_inputs_are_strict() {
        let c = json!({"version": "1.30", "node_count": 3, "node_flavor": "m1.large"});
        assert!(apply(
            Kind::Cluster,
            Action::Upgrade,
            &c,
            &json!({"version": "1.31"})
        )
        .is_ok());
        assert!(apply(
            Kind::Cluster,
            Action::Upgrade,
            &c,
            &json!({"version": "1.29"})
        )
        .is_err());
        assert_eq!(
            apply(
                Kind::Cluster,
                Action::Scale,
                &c,
                &json!({"node_count": 3, "x": 1})
            )
            .unwrap_err()
            .code,
            "invalid_body"
        );
        assert_eq!(
            apply(Kind::Vm, Action::Stop, &c, &json!({"force": true}))
                .unwrap_err()
                .code,
            "invalid_body"
        );
    }

    #[test]
    fn every_kind_parses_only_its_own_actions() {
        assert_eq!(parse(Kind::Vm, "reboot"), Some(Action::Reboot));
        assert_eq!(parse(Kind::Vm, "scale"), None);
        assert_eq!(parse(Kind::Bm, "power_on"), Some(Action::PowerOn));
        assert_eq!(parse(Kind::Volume, "create"), None);
        for kind in Kind::ALL {
            assert!(!supported(*kind).contains(&Action::Create));
        }
    }
}
