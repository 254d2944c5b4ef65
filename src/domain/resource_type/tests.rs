use super::*;
use crate::domain::spec::Category;
use serde_json::json;

/// The built-in types, as the migration seeds them.
fn builtin(kind: &str) -> ResourceType {
    let sql = include_str!("../../../migrations/0013_resource_types.sql");
    let start = sql
        .find(&format!("('{kind}', "))
        .expect("the migration seeds the kind");
    let row = &sql[start..];
    let (plural, service) = (
        row.split('\'').nth(3).unwrap(),
        row.split('\'').nth(5).unwrap(),
    );
    let body = row.split("$json$").nth(1).unwrap();
    let mut def: Value = serde_json::from_str(body).unwrap();
    def["kind"] = json!(kind);
    def["plural"] = json!(plural);
    def["service"] = json!(service);
    let def: TypeDef = serde_json::from_value(def).unwrap();
    ResourceType::compile(def, 1, &|_| true).unwrap()
}

fn loadbalancer() -> Value {
    json!({
        "kind": "loadbalancer", "plural": "load-balancers", "service": "network",
        "spec_schema": {
            "type": "object", "additionalProperties": false, "required": ["vm", "port"],
            "properties": {
                "vm": {"type": "string", "format": "uuid", "x-reference": {"kind": "vm"}},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "listeners": {"type": "integer", "minimum": 1, "default": 1, "x-only-grows": true},
                "scheme": {"type": "string", "enum": ["internal", "public"], "default": "internal", "x-immutable": true}
            }
        },
        "actions": {
            "drain": {"description": "Stop taking new connections."},
            "set_port": {
                "input_schema": {"type": "object", "additionalProperties": false, "required": ["port"],
                                 "properties": {"port": {"type": "integer"}}},
                "patch": {"port": {"$input": "/port"}}
            }
        }
    })
}

fn compile(def: Value) -> Result<ResourceType, ValidationError> {
    let def: TypeDef = serde_json::from_value(def).unwrap();
    ResourceType::compile(def, 1, &|k| k == "vm")
}

#[test]
fn the_built_in_kinds_compile_and_take_their_documented_examples() {
    let examples = [
        ("vm", json!({"flavor": "m1.small", "image": "debian-12"})),
        (
            "bm",
            json!({"machine_class": "bm.standard", "image": "debian-12"}),
        ),
        (
            "cluster",
            json!({"version": "1.31", "node_count": 3, "node_flavor": "m1.large"}),
        ),
        ("volume", json!({"size_gb": 20, "class": "ssd"})),
    ];
    for (kind, spec) in examples {
        let t = builtin(kind);
        assert!(t.validate_spec(&spec, None).is_ok(), "{kind}");
    }
    let vm =
        builtin("vm").validate_spec(&json!({"flavor": "m1.small", "image": "debian-12"}), None);
    let vm = vm.unwrap();
    assert_eq!(
        vm.value["power_state"], "running",
        "the default is filled in"
    );
    let names: Vec<_> = vm
        .catalog
        .iter()
        .map(|r| (r.field.as_str(), r.category))
        .collect();
    assert_eq!(
        names,
        [
            ("spec.flavor", Category::Flavor),
            ("spec.image", Category::Image)
        ]
    );
}

#[test]
fn bad_specs_name_the_failing_field_as_a_pointer() {
    let cluster = builtin("cluster");
    let cases = [
        (
            json!({"version": "1.31", "node_count": 0, "node_flavor": "m1.large"}),
            "spec.node_count",
            "/spec/node_count",
        ),
        (
            json!({"version": "1.31", "node_count": "3", "node_flavor": "m1.large"}),
            "spec.node_count",
            "/spec/node_count",
        ),
        (
            json!({"version": "1.31", "node_flavor": "m1.large"}),
            "spec",
            "/spec",
        ),
        (
            json!({"version": "1.31", "node_count": 3, "node_flavor": "m1.large", "gpu": 1}),
            "spec",
            "/spec",
        ),
        (json!("1.31"), "spec", "/spec"),
    ];
    for (spec, field, pointer) in cases {
        let err = cluster.validate_spec(&spec, None).unwrap_err();
        assert_eq!(err.code, "invalid_spec", "{spec}");
        assert_eq!(
            (err.field.as_str(), err.json_pointer().as_str()),
            (field, pointer),
            "{spec}"
        );
    }
    let vol = builtin("volume");
    let err = vol
        .validate_spec(
            &json!({"size_gb": 20, "class": "ssd", "attached_to": "nope"}),
            None,
        )
        .unwrap_err();
    assert_eq!(err.field, "spec.attached_to");
}

#[test]
fn actions_change_the_spec_as_their_definitions_say() {
    let vm = builtin("vm");
    let spec = json!({"flavor": "m1.small", "image": "debian-12", "power_state": "running"});
    let stop = vm
        .apply_action(&Action::named("stop"), &spec, &Value::Null)
        .unwrap()
        .unwrap();
    assert_eq!(
        stop,
        Effect::NewSpec(
            json!({"flavor": "m1.small", "image": "debian-12", "power_state": "stopped"})
        )
    );
    assert_eq!(
        vm.apply_action(&Action::named("reboot"), &spec, &json!({}))
            .unwrap()
            .unwrap(),
        Effect::Imperative
    );
    let Effect::NewSpec(stopped) = stop else {
        panic!()
    };
    let err = vm
        .apply_action(&Action::named("reboot"), &stopped, &json!({}))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        (err.code.as_ref(), err.field.as_str()),
        ("invalid_state", "spec.power_state")
    );
    let Effect::NewSpec(bigger) = vm
        .apply_action(
            &Action::named("resize"),
            &spec,
            &json!({"flavor": "m1.large"}),
        )
        .unwrap()
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(bigger["flavor"], "m1.large");
    assert!(vm
        .apply_action(&Action::named("scale"), &spec, &json!({}))
        .is_none());
    let strict = vm
        .apply_action(&Action::named("stop"), &spec, &json!({"force": true}))
        .unwrap();
    assert_eq!(strict.unwrap_err().code, "invalid_body");
    let bm = builtin("bm");
    let bm_spec =
        json!({"machine_class": "bm.standard", "image": "debian-12", "power_state": "on"});
    let as_is = bm
        .apply_action(&Action::named("reprovision"), &bm_spec, &json!({}))
        .unwrap();
    assert_eq!(
        as_is.unwrap(),
        Effect::Imperative,
        "no image: reinstall as is"
    );
}

#[test]
fn volumes_only_grow_attach_once_and_upgrades_only_go_forward() {
    let vol = builtin("volume");
    let spec = json!({"size_gb": 20, "class": "ssd"});
    let resize = |n: u32| {
        vol.apply_action(&Action::named("resize"), &spec, &json!({"size_gb": n}))
            .unwrap()
    };
    assert_eq!(resize(20).unwrap_err().code, "invalid_spec");
    assert_eq!(resize(10).unwrap_err().code, "invalid_spec");
    assert!(resize(21).is_ok());
    // The resize action only grows it; a patch may set any size, as it always could.
    assert!(vol
        .validate_spec(&json!({"size_gb": 10, "class": "ssd"}), Some(&spec))
        .is_ok());
    let vm = Uuid::now_v7();
    let attach = |s: &Value| {
        vol.apply_action(&Action::named("attach"), s, &json!({"vm_id": vm}))
            .unwrap()
    };
    let Effect::NewSpec(attached) = attach(&spec).unwrap() else {
        panic!()
    };
    assert_eq!(attach(&attached).unwrap_err().code, "invalid_state");
    let detach = |s: &Value| {
        vol.apply_action(&Action::named("detach"), s, &json!({}))
            .unwrap()
    };
    assert_eq!(detach(&spec).unwrap_err().code, "invalid_state");
    assert_eq!(detach(&attached).unwrap(), Effect::NewSpec(spec.clone()));
    let refs = vol.validate_spec(&attached, None).unwrap().references;
    assert_eq!(
        (refs[0].kind.as_str(), refs[0].id, refs[0].code.as_str()),
        ("vm", vm, "invalid_attachment")
    );
    let cluster = builtin("cluster");
    let c = json!({"version": "1.30", "node_count": 3, "node_flavor": "m1.large"});
    let upgrade = |v: &str| {
        cluster
            .apply_action(&Action::named("upgrade"), &c, &json!({"version": v}))
            .unwrap()
    };
    assert!(upgrade("1.31").is_ok());
    assert!(upgrade("1.30").is_err());
    assert!(upgrade("1.9").is_err(), "1.9 is older than 1.30");
}

#[test]
fn footprints_come_from_x_quota() {
    let cluster = builtin("cluster");
    let spec = json!({"version": "1.31", "node_count": 3, "node_flavor": "m1.large"});
    let entries = BTreeMap::from([(
        "spec.node_flavor".to_owned(),
        json!({"vcpus": 4, "memory_mb": 8192}),
    )]);
    let a = cluster.footprint(&spec, &entries);
    assert_eq!(
        (a.count, a.nodes, a.vcpus, a.memory_mb, a.storage_gb),
        (1, 3, 12, 24576, 0)
    );
    let vol =
        builtin("volume").footprint(&json!({"size_gb": 20, "class": "ssd"}), &BTreeMap::new());
    assert_eq!((vol.count, vol.storage_gb, vol.vcpus), (1, 20, 0));
    assert_eq!(builtin("bm").dimensions(), [Dimension::Count]);
    assert_eq!(
        builtin("volume").dimensions(),
        [Dimension::Count, Dimension::StorageGb]
    );
}

#[test]
fn a_registered_kind_has_its_own_rules() {
    let lb = compile(loadbalancer()).unwrap();
    let vm = Uuid::now_v7();
    let spec = json!({"vm": vm, "port": 443});
    let valid = lb.validate_spec(&spec, None).unwrap();
    assert_eq!(valid.value["listeners"], 1);
    assert_eq!(valid.references[0].code, "invalid_reference");
    let changed_scheme = json!({"vm": vm, "port": 443, "listeners": 1, "scheme": "public"});
    let err = lb
        .validate_spec(&changed_scheme, Some(&valid.value))
        .unwrap_err();
    assert_eq!(
        (err.code.as_ref(), err.field.as_str()),
        ("immutable_field", "spec.scheme")
    );
    let fewer = json!({"vm": vm, "port": 443, "listeners": 0});
    assert_eq!(
        lb.validate_spec(&fewer, Some(&valid.value))
            .unwrap_err()
            .field,
        "spec.listeners"
    );
    let port = lb
        .apply_action(
            &Action::named("set_port"),
            &valid.value,
            &json!({"port": 0}),
        )
        .unwrap()
        .unwrap();
    let Effect::NewSpec(next) = port else {
        panic!()
    };
    assert_eq!(
        lb.validate_spec(&next, Some(&valid.value))
            .unwrap_err()
            .field,
        "spec.port"
    );
}

#[test]
fn definitions_that_cannot_work_are_refused_with_the_field() {
    let with = |pointer: &str, value: Value| {
        let mut def = loadbalancer();
        let (parent, last) = pointer.rsplit_once('/').unwrap();
        def.pointer_mut(parent).unwrap()[last] = value;
        compile(def).unwrap_err()
    };
    let cases = [
        ("/plural", json!("Load_Balancers"), "plural"),
        ("/plural", json!("events"), "plural"),
        ("/plural", json!("quotas"), "plural"),
        ("/plural", json!("9lives"), "plural"),
        ("/plural", json!("lbs-"), "plural"),
        (
            "/spec_schema/properties/vm/x-reference",
            json!({"kind": "vm", "code": "Not Found!"}),
            "spec_schema.vm.x-reference.code",
        ),
        ("/spec_schema/type", json!("string"), "spec_schema.type"),
        (
            "/spec_schema/properties/port/minimum",
            json!("one"),
            "spec_schema",
        ),
        (
            "/spec_schema/properties/vm/x-reference",
            json!({"kind": "router"}),
            "spec_schema.vm.x-reference.kind",
        ),
        (
            "/spec_schema/properties/port/x-catalog",
            json!("colour"),
            "spec_schema.port.x-catalog",
        ),
        (
            "/actions/drain",
            json!({"requires": [{"field": "/nope", "present": true, "message": "m"}]}),
            "actions.drain.requires[0].field",
        ),
        (
            "/actions/drain",
            json!({"requires": [{"field": "/port", "message": "m"}]}),
            "actions.drain.requires[0]",
        ),
        (
            "/actions/drain",
            json!({"patch": [1]}),
            "actions.drain.patch",
        ),
    ];
    for (pointer, value, field) in cases {
        let err = with(pointer, value.clone());
        assert_eq!(err.code, "invalid_resource_type", "{pointer} = {value}");
        assert!(
            err.field.starts_with(field),
            "{pointer} = {value}: {}",
            err.field
        );
    }
    let mut core = loadbalancer();
    core["actions"]["delete"] = json!({});
    assert_eq!(compile(core).unwrap_err().field, "actions.delete");
}

/// Checks the load balancer type, changed by `f`, as the next version of itself.
fn change(f: &dyn Fn(&mut Value)) -> Result<(), ValidationError> {
    let old: TypeDef = serde_json::from_value(loadbalancer()).unwrap();
    let mut def = loadbalancer();
    f(&mut def);
    let new: TypeDef = serde_json::from_value(def).unwrap();
    evolution::check(&old, &new)
}

#[test]
fn a_type_may_widen() {
    // Additive: an optional field, a new action, a looser bound, a new enum value, a
    // new required field with a default, a field no longer immutable.
    let ok: Vec<&dyn Fn(&mut Value)> = vec![
        &|d| d["spec_schema"]["properties"]["tls"] = json!({"type": "boolean"}),
        &|d| d["actions"]["restart"] = json!({}),
        &|d| d["spec_schema"]["properties"]["port"]["maximum"] = json!(70000),
        &|d| {
            d["spec_schema"]["properties"]["scheme"]["enum"] = json!(["internal", "public", "edge"])
        },
        &|d| {
            d["spec_schema"]["properties"]["mode"] = json!({"type": "string", "default": "tcp"});
            d["spec_schema"]["required"] = json!(["vm", "port", "mode"]);
        },
        &|d| d["spec_schema"]["properties"]["scheme"]["x-immutable"] = json!(false),
        &|d| d["description"] = json!("now documented"),
    ];
    for (i, f) in ok.iter().enumerate() {
        assert!(change(*f).is_ok(), "additive change {i}: {:?}", change(*f));
    }
}

#[test]
fn a_type_may_not_narrow() {
    type Narrowing<'a> = (&'a dyn Fn(&mut Value), &'a str);
    let breaking: Vec<Narrowing> = vec![
        (
            &|d| {
                d["spec_schema"]["properties"]
                    .as_object_mut()
                    .unwrap()
                    .remove("listeners");
            },
            "spec_schema.properties.listeners",
        ),
        (
            &|d| d["spec_schema"]["properties"]["port"]["type"] = json!("string"),
            "spec_schema.properties.port.type",
        ),
        (
            &|d| d["spec_schema"]["properties"]["port"]["maximum"] = json!(1024),
            "spec_schema.properties.port.maximum",
        ),
        (
            &|d| d["spec_schema"]["properties"]["scheme"]["enum"] = json!(["internal"]),
            "spec_schema.properties.scheme.enum",
        ),
        (
            &|d| {
                d["spec_schema"]["properties"]["mode"] = json!({"type": "string"});
                d["spec_schema"]["required"] = json!(["vm", "port", "mode"]);
            },
            "spec_schema.required",
        ),
        (
            &|d| {
                d["actions"].as_object_mut().unwrap().remove("drain");
            },
            "actions.drain",
        ),
        (
            &|d| {
                d["actions"]["set_port"]["input_schema"]["properties"]["port"]["minimum"] = json!(1)
            },
            "actions.set_port.input_schema.properties.port.minimum",
        ),
        (&|d| d["plural"] = json!("lbs"), "plural"),
        (&|d| d["service"] = json!("edge"), "service"),
        (
            &|d| d["spec_schema"]["properties"]["port"]["pattern"] = json!("^4"),
            "spec_schema.properties.port.pattern",
        ),
        (
            &|d| d["spec_schema"]["properties"]["port"]["x-immutable"] = json!(true),
            "spec_schema.properties.port.x-immutable",
        ),
    ];
    for (f, field) in breaking {
        let err = change(f).unwrap_err();
        assert_eq!(
            (err.code.as_ref(), err.field.as_str()),
            ("breaking_change", field)
        );
    }
}

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
fn what_counts_against_a_quota_is_a_whole_number_0_or_more() {
    // A registered kind whose quota fields the schema leaves loose: a `number`, and an
    // integer with no minimum that multiplies a catalog attribute.
    let loose = compile(json!({
        "kind": "tank", "plural": "tanks", "service": "tanks",
        "spec_schema": {"type": "object", "properties": {
            "cap": {"type": "number", "x-quota": {"dimension": "storage_gb"}},
            "units": {"type": "integer"},
            "flavor": {"type": "string", "x-catalog": "flavor",
                       "x-quota": {"catalog_attributes": ["vcpus"], "times": "/units"}}
        }},
        "actions": {}
    }))
    .unwrap();
    for (spec, field) in [
        (json!({"cap": -5}), "spec.cap"),
        (json!({"cap": 50000.5}), "spec.cap"),
        (json!({"flavor": "m1.small", "units": -3}), "spec.units"),
        (json!({"cap": 9223372036854775808u64}), "spec.cap"),
    ] {
        let e = loose.validate_spec(&spec, None).unwrap_err();
        assert_eq!(
            (e.code.as_ref(), e.field.as_str()),
            ("invalid_spec", field),
            "{spec}"
        );
    }
    assert!(loose.validate_spec(&json!({"cap": 0}), None).is_ok());
    assert!(loose
        .validate_spec(&json!({"cap": 7, "flavor": "m1.small", "units": 2}), None)
        .is_ok());
    // Without the catalog field, `units` counts for nothing and is not checked.
    assert!(loose.validate_spec(&json!({"units": -1}), None).is_ok());
}

#[test]
fn a_spec_with_whole_decimals_validates_as_integers() {
    // As a spec stored before the API read whole decimals as integers may hold them:
    // a change of it still validates, and what it counts is counted.
    let cluster = builtin("cluster");
    let stored = json!({"version": "1.31", "node_count": 3.0, "node_flavor": "m1.large"});
    let valid = cluster.validate_spec(&stored, Some(&stored)).unwrap();
    assert!(valid.value["node_count"].is_i64(), "{}", valid.value);
    let a = cluster.footprint(&valid.value, &BTreeMap::new());
    assert_eq!(a.nodes, 3);
}
