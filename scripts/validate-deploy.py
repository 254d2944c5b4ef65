#!/usr/bin/env python3
"""Validates the deployment files offline: the Kubernetes manifests (every overlay under
deploy/kubernetes/overlays, rendered by `kubectl kustomize`) and compose.yaml.

Run through scripts/validate-deploy.sh, which makes the Python environment this needs
(kubernetes-validate, jsonschema, PyYAML). Commands:

  check [--facts FILE]   validate everything; write what the tests assert to FILE (JSON)
  sync-rules             rewrite the PrometheusRule copy from deploy/prometheus/alerts.yml
  vendor-crd CRD.yaml…   extract the schemas of custom resources into deploy/kubernetes/schemas

What `check` does, per overlay:
  - built-in kinds: validated against the Kubernetes OpenAPI schemas of KUBERNETES_VERSION
    (kubernetes-validate, strict: unknown fields are errors);
  - custom resources (CloudNativePG Cluster, ServiceMonitor, PodMonitor, PrometheusRule):
    validated against the schemas of their CRDs, vendored in deploy/kubernetes/schemas,
    closed (unknown fields are errors, as with kubectl's strict field validation). CEL
    rules (x-kubernetes-validations) are not evaluated;
  - the NATS configuration, parsed by `nats-server -t` (needs nats-server, which
    scripts/services.sh installs for the tests);
  - the properties the deployment promises (replicas, probes, disruption budgets,
    spreading, graceful termination, worker keys, migrations, NATS and PostgreSQL
    replication, monitoring), each failure naming the object.
And compose.yaml: validated against the Compose Specification schema (vendored), and its
workers must log in with their own pool's worker key, never the admin key.
"""

import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
SCHEMAS = K8S / "schemas"
OVERLAYS = K8S / "overlays"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway.json"
RULE_COPY = K8S / "base" / "monitoring" / "prometheusrule.yaml"
COMPOSE = ROOT / "compose.yaml"

# The Kubernetes version the manifests are validated against: the oldest still
# supported upstream when this was written; features newer than it are not used.
KUBERNETES_VERSION = "1.31"

SERVICES = ["vm", "bm", "k8s", "storage"]
ZONES = ["zone-a", "zone-b"]
ZONE_LABEL = "topology.kubernetes.io/zone"
HOST_LABEL = "kubernetes.io/hostname"

# Secrets the manifests use but never contain (README, "Deploying on Kubernetes").
ADMIN_SECRET = "gateway-admin-key"
WEBHOOK_KEY_SECRET = "gateway-webhook-key"
# The relays' dispatch signing key, and its public half for the workers (made by
# `gateway dispatch-key`).
SIGNING_KEY_SECRET = "dispatch-signing-key"
PUBLIC_KEYS_CONFIGMAP = "dispatch-public-keys"
# The broker's users file and each user's NKEY seed (made by `gateway nats-config`).
NATS_AUTH_SECRET = "nats-auth"
NATS_USERS = ["gateway", "relay"] + [f"worker-{s}-{z}" for s in SERVICES for z in ZONES]
EXTERNAL_SECRETS = ({ADMIN_SECRET, WEBHOOK_KEY_SECRET, SIGNING_KEY_SECRET, NATS_AUTH_SECRET}
                    | {f"worker-key-{s}-{z}" for s in SERVICES for z in ZONES}
                    | {f"nats-seed-{u}" for u in NATS_USERS})
EXTERNAL_CONFIGMAPS = {PUBLIC_KEYS_CONFIGMAP}

CUSTOM_KINDS = {
    ("postgresql.cnpg.io/v1", "Cluster"): "cluster-postgresql.cnpg.io-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
}


class Failures:
    def __init__(self):
        self.messages = []

    def check(self, ok, message):
        if not ok:
            self.messages.append(message)
        return ok


# ---------------------------------------------------------------------------------------
# Rendering and schemas


def render(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {overlay.relative_to(ROOT)} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def close_schema(node):
    """Makes every object schema with listed properties refuse other properties, as the
    API server does with strict field validation (unless it preserves unknown fields)."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            close_schema(v)
    elif isinstance(node, list):
        for v in node:
            close_schema(v)
    return node


_custom_validators = {}


def custom_validator(api_version, kind):
    key = (api_version, kind)
    if key not in _custom_validators:
        schema = json.loads((SCHEMAS / CUSTOM_KINDS[key]).read_text())
        schema = close_schema(schema)
        # metadata is checked for every object below, as ObjectMeta.
        schema["properties"]["metadata"] = {"type": "object"}
        _custom_validators[key] = jsonschema.Draft4Validator(schema)
    return _custom_validators[key]


def cache_kubernetes_schemas():
    """kubernetes-validate reads its 1 MB definitions file for every object: read once."""
    import functools

    import kubernetes_validate.utils as kv

    if hasattr(kv, "schema_contents") and not hasattr(kv.schema_contents, "cache_info"):
        kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)


def validate_object(doc, where, f):
    import kubernetes_validate

    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    label = f"{where}: {kind}/{name}"
    f.check(isinstance(name, str) and name, f"{label}: metadata.name missing")
    for field in ("labels", "annotations"):
        values = meta.get(field) or {}
        f.check(
            isinstance(values, dict) and all(isinstance(v, str) for v in values.values()),
            f"{label}: metadata.{field} must map strings to strings",
        )
    if (api_version, kind) in CUSTOM_KINDS:
        errors = sorted(custom_validator(api_version, kind).iter_errors(doc), key=str)
        for e in errors[:5]:
            path = ".".join(str(p) for p in e.absolute_path)
            f.check(False, f"{label}: {path}: {e.message}")
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        f.check(False, f"{label}: {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError:
        f.check(False, f"{label}: no schema for {api_version} {kind} in Kubernetes {KUBERNETES_VERSION}")


def check_nats_config(where, nats, conf_name, conf_text, f):
    """Parses the NATS configuration with nats-server itself (`-t`: test and exit; unknown
    fields are errors), with the container's environment for its $VARIABLES."""
    import shutil
    import tempfile

    server = shutil.which("nats-server")
    if not f.check(server, f"{where}: nats-server is needed to check the NATS configuration (scripts/services.sh installs it)"):
        return False
    env = {"PATH": os.environ.get("PATH", "")}
    for e in container(nats, "nats").get("env", []):
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = e.get("value") or (f"{nats['metadata']['name']}-0" if field == "metadata.name" else "placeholder")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nats.conf"
        path.write_text(conf_text)
        # The users file is the nats-auth Secret's (`gateway nats-config` writes it; the
        # nats_auth tests run servers with it): a stand-in users block lets the rest parse.
        (Path(tmp) / "auth.conf").write_text('authorization { users = [ { user: "check", password: "placeholder" } ] }\n')
        out = subprocess.run([server, "-t", "-c", str(path)], capture_output=True, text=True, env=env)
    return f.check(out.returncode == 0, f"{where}: ConfigMap/{conf_name} nats.conf: {(out.stdout + out.stderr).strip()}")


# ---------------------------------------------------------------------------------------
# Properties of the rendered manifests


def index(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def pod_spec(doc):
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def container(doc, name=None):
    cs = pod_spec(doc)["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def secret_ref(e):
    ref = (e or {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def nats_user(c):
    """The broker user container `c` logs in as: `u` when its NATS_NKEY_SEED comes from
    key `seed` of Secret `nats-seed-u`, else None."""
    ref = secret_ref(env_of(c).get("NATS_NKEY_SEED"))
    if ref and ref[1] == "seed" and ref[0].startswith("nats-seed-"):
        return ref[0][len("nats-seed-"):]
    return None


def check_nats_login(where, label, c, user, f):
    """Every process that connects to NATS logs in as its own user (the broker refuses
    anyone else): NATS_NKEY_SEED from Secret nats-seed-<user>, and no other kind of
    NATS credentials beside it."""
    got = nats_user(c)
    f.check(got == user, f"{where}: {label}: must log in to NATS as `{user}` (NATS_NKEY_SEED from key `seed` of Secret nats-seed-{user}), got {got}")
    others = {"NATS_NKEY_SEED_FILE", "NATS_CREDS", "NATS_USER", "NATS_PASSWORD"} & set(env_of(c))
    f.check(not others, f"{where}: {label}: give NATS_NKEY_SEED only, not also {sorted(others)}")
    return got


def database_url(doc, name):
    """How container `name` of `doc` reaches PostgreSQL: the (Secret, key) its
    DATABASE_URL comes from (directly, or as `$(VAR)?params` with VAR from a Secret and
    defined before it, as Kubernetes expands it), the `sslmode` it asks for, and the
    Secret mounted where its `sslrootcert` points."""
    c = container(doc, name)
    env = c.get("env", [])
    names = [e["name"] for e in env]
    e = env_of(c).get("DATABASE_URL")
    if e is None:
        return None
    ref, params = secret_ref(e), {}
    m = re.fullmatch(r"\$\((\w+)\)(?:\?(.*))?", e.get("value") or "")
    if m and m.group(1) in names and names.index(m.group(1)) < names.index("DATABASE_URL"):
        ref = secret_ref(env_of(c).get(m.group(1)))
        params = dict(urllib.parse.parse_qsl(m.group(2) or ""))
    root, ca = params.get("sslrootcert"), None
    if root:
        volumes = {v["name"]: v for v in pod_spec(doc).get("volumes", [])}
        for mount in c.get("volumeMounts", []):
            if root.startswith(mount["mountPath"].rstrip("/") + "/"):
                ca = volumes.get(mount["name"], {}).get("secret", {}).get("secretName")
    return {"secret": list(ref) if ref else None, "sslmode": params.get("sslmode"), "ca_secret": ca}


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def probe_path(c, probe):
    p = c.get(probe)
    return p and p.get("httpGet", {}).get("path")


def drain_timeout_seconds():
    text = (ROOT / "src" / "serve.rs").read_text()
    m = re.search(r"DRAIN_TIMEOUT: Duration = Duration::from_secs\((\d+)\)", text)
    if not m:
        raise SystemExit(
            "src/serve.rs: DRAIN_TIMEOUT (Duration::from_secs(N)) not found; "
            "update scripts/validate-deploy.py with where the drain time now lives"
        )
    return int(m.group(1))


def spread_keys(spec, hard_only):
    keys = set()
    for t in spec.get("topologySpreadConstraints", []):
        if not hard_only or t["whenUnsatisfiable"] == "DoNotSchedule":
            keys.add(t["topologyKey"])
    anti = spec.get("affinity", {}).get("podAntiAffinity", {})
    for t in anti.get("requiredDuringSchedulingIgnoredDuringExecution", []):
        keys.add(t["topologyKey"])
    return keys


def check_overlay(name, docs, f):
    """Checks one rendered overlay; returns the facts the Rust test asserts."""
    where = f"overlays/{name}"
    production = name == "production"
    objs = index(docs)
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)

    def get(kind, obj_name):
        d = objs.get((kind, obj_name))
        f.check(d is not None, f"{where}: {kind}/{obj_name} is missing")
        return d

    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    f.check(len(namespaces) == 1 and None not in namespaces, f"{where}: objects must share one namespace, got {namespaces}")
    f.check("Secret" not in kinds, f"{where}: contains a Secret; secrets are never in the repository")

    # Every workload: resources, a restricted security context, no API token.
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        label = f"{where}: {d['kind']}/{d['metadata']['name']}"
        f.check(spec.get("automountServiceAccountToken") is False, f"{label}: automountServiceAccountToken must be false")
        psc = spec.get("securityContext", {})
        f.check(psc.get("runAsNonRoot") is True, f"{label}: runAsNonRoot")
        f.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label}: seccompProfile RuntimeDefault")
        for c in spec["containers"]:
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                f.check({"cpu", "memory"} <= set(res.get(kind, {})), f"{label}: container {c['name']}: resources.{kind} needs cpu and memory")
            sc = c.get("securityContext", {})
            f.check(sc.get("allowPrivilegeEscalation") is False, f"{label}: {c['name']}: allowPrivilegeEscalation false")
            f.check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: {c['name']}: drop ALL capabilities")
            if d["kind"] != "Job":
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    f.check(probe in c, f"{label}: {c['name']}: {probe} missing")
        # Only the migrate Job sees the admin key.
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = secret_ref(e)
                if ref and ref[0] == ADMIN_SECRET:
                    f.check(d["kind"] == "Job" and d["metadata"]["name"] == "migrate", f"{label}: only the migrate Job may read {ADMIN_SECRET}")

    # References: ConfigMaps must be rendered; Secrets must be the documented external
    # ones or the one CloudNativePG makes.
    cnpg = get("Cluster", "postgres")
    cnpg_secret = "postgres-app"
    configmaps = {d["metadata"]["name"] for d in kinds.get("ConfigMap", [])}
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        label = f"{where}: {d['kind']}/{d['metadata']['name']}"
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    f.check(src["configMapRef"]["name"] in configmaps, f"{label}: ConfigMap {src['configMapRef']['name']} is not rendered")
            for e in c.get("env", []):
                ref = secret_ref(e)
                if ref:
                    f.check(ref[0] in EXTERNAL_SECRETS | {cnpg_secret}, f"{label}: Secret {ref[0]} is neither made by CloudNativePG nor documented")
                cm = e.get("valueFrom", {}).get("configMapKeyRef")
                if cm:
                    f.check(cm["name"] in configmaps | EXTERNAL_CONFIGMAPS, f"{label}: ConfigMap {cm['name']} is neither rendered nor documented")
        for v in spec.get("volumes", []):
            if "configMap" in v:
                f.check(v["configMap"]["name"] in configmaps, f"{label}: ConfigMap {v['configMap']['name']} is not rendered")

    # Selectors of PDBs, Services and monitors select pods that exist.
    templates = [(d, d["spec"]["template"]["metadata"]["labels"]) for d in docs if pod_spec(d) is not None]

    def selects(selector):
        return [d for d, labels in templates if labels_match(selector, labels)]

    for d in kinds.get("PodDisruptionBudget", []) + kinds.get("PodMonitor", []) + kinds.get("ServiceMonitor", []) + kinds.get("Service", []):
        if d["kind"] == "Service":
            selector = d["spec"].get("selector")
        elif d["kind"] == "ServiceMonitor":
            svc = [s for s in kinds.get("Service", []) if labels_match(d["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
            f.check(svc, f"{where}: ServiceMonitor/{d['metadata']['name']} selects no Service")
            continue
        else:
            selector = d["spec"]["selector"]["matchLabels"]
        if "cnpg.io/cluster" in (selector or {}):
            continue  # CloudNativePG's own pods
        f.check(selects(selector), f"{where}: {d['kind']}/{d['metadata']['name']} selects no pod")

    def pdbs_for(doc):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        return [p["metadata"]["name"] for p in kinds.get("PodDisruptionBudget", []) if labels_match(p["spec"]["selector"]["matchLabels"], labels)]

    # Every long-running workload has exactly one disruption budget.
    for d in kinds.get("Deployment", []) + kinds.get("StatefulSet", []):
        f.check(len(pdbs_for(d)) == 1, f"{where}: {d['kind']}/{d['metadata']['name']} needs exactly one PodDisruptionBudget, has {pdbs_for(d)}")

    facts = {}

    # --- gateway serve
    gw = get("Deployment", "gateway")
    hpa = get("HorizontalPodAutoscaler", "gateway")
    if gw and hpa:
        spec = pod_spec(gw)
        c = container(gw, "gateway")
        f.check(c["args"] == ["serve"], f"{where}: gateway runs `serve`")
        f.check(hpa["spec"]["scaleTargetRef"]["name"] == "gateway", f"{where}: the HPA scales the gateway")
        f.check("replicas" not in gw["spec"], f"{where}: the gateway's replicas belong to its HPA")
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = int(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0
        drain = drain_timeout_seconds()
        grace = spec.get("terminationGracePeriodSeconds", 30)
        f.check(sleep >= 5, f"{where}: gateway preStop sleeps at least 5 s so endpoints go before the drain")
        f.check(grace > sleep + drain, f"{where}: gateway terminationGracePeriodSeconds {grace} must exceed preStop {sleep} s + DRAIN_TIMEOUT {drain} s")
        facts["gateway"] = {
            "min_replicas": hpa["spec"]["minReplicas"],
            "max_replicas": hpa["spec"]["maxReplicas"],
            "readiness_path": probe_path(c, "readinessProbe"),
            "liveness_path": probe_path(c, "livenessProbe"),
            "startup_path": probe_path(c, "startupProbe"),
            "pdb": pdbs_for(gw),
            "pre_stop_sleep": sleep,
            "drain_timeout": drain,
            "termination_grace": grace,
            "hard_spread": sorted(spread_keys(spec, True)),
            "spread": sorted(spread_keys(spec, False)),
            "database": database_url(gw, "gateway"),
            "nats_user": check_nats_login(where, "gateway", c, "gateway", f),
        }
        ing = get("Ingress", "gateway")
        if ing:
            backends = {p["backend"]["service"]["name"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]}
            f.check(backends == {"gateway"}, f"{where}: the Ingress routes to the gateway Service")
            facts["gateway"]["ingress_paths"] = sorted(p["path"] for r in ing["spec"]["rules"] for p in r["http"]["paths"])

    # --- relay
    relay = get("Deployment", "relay")
    if relay:
        c = container(relay, "relay")
        f.check(c["args"] == ["relay"], f"{where}: relay runs `relay`")
        signing = env_of(c).get("GATEWAY_DISPATCH_SIGNING_KEY")
        f.check(secret_ref(signing) == (SIGNING_KEY_SECRET, "key"), f"{where}: the relay signs dispatches with GATEWAY_DISPATCH_SIGNING_KEY from Secret {SIGNING_KEY_SECRET} (it does not start without one)")
        facts["relay"] = {
            "signing_key_secret": list(secret_ref(signing) or []),
            "nats_user": check_nats_login(where, "relay", c, "relay", f),
            "replicas": relay["spec"].get("replicas", 1),
            "pdb": pdbs_for(relay),
            "readiness_path": probe_path(c, "readinessProbe"),
        }

    # --- workers
    workers = []
    for d in kinds.get("Deployment", []):
        c = container(d)
        if c.get("command") != ["worker"]:
            continue
        env = env_of(c)
        spec = pod_spec(d)
        service = env.get("WORKER_SERVICE", {}).get("value")
        zone = env.get("WORKER_ZONE", {}).get("value")
        key = secret_ref(env.get("GATEWAY_KEY"))
        node_zone = spec.get("nodeSelector", {}).get(ZONE_LABEL)
        label = f"{where}: Deployment/{d['metadata']['name']}"
        f.check(d["metadata"]["name"] == f"worker-{service}-{zone}", f"{label}: named worker-<service>-<zone>")
        # Pinned to its zone's nodes (only the dev overlay, for one-node clusters, may
        # leave the node free; a pin to another zone is wrong anywhere).
        f.check(node_zone == zone or (node_zone is None and not production), f"{label}: runs on nodes of its zone {zone}, nodeSelector says {node_zone}")
        f.check(key == (f"worker-key-{service}-{zone}", "key"), f"{label}: GATEWAY_KEY must come from Secret worker-key-{service}-{zone}, got {key}")
        f.check("GATEWAY_ADMIN_KEY" not in env, f"{label}: a worker must not get the admin key")
        public = env.get("WORKER_DISPATCH_PUBLIC_KEYS", {}).get("valueFrom", {}).get("configMapKeyRef", {})
        f.check((public.get("name"), public.get("key")) == (PUBLIC_KEYS_CONFIGMAP, "keys"), f"{label}: WORKER_DISPATCH_PUBLIC_KEYS must come from ConfigMap {PUBLIC_KEYS_CONFIGMAP} (a worker does not start without it)")
        f.check("GATEWAY_DISPATCH_SIGNING_KEY" not in env and SIGNING_KEY_SECRET not in json.dumps(spec), f"{label}: a worker must not get the dispatch signing key")
        f.check(env.get("GATEWAY_URL", {}).get("value", "").startswith("http://gateway:"), f"{label}: reports to the gateway Service")
        workers.append({
            "name": d["metadata"]["name"],
            "service": service,
            "zone": zone,
            "node_zone": node_zone,
            "key_secret": key[0] if key else None,
            "public_keys": public.get("name"),
            "nats_user": check_nats_login(where, label, c, f"worker-{service}-{zone}", f),
            "replicas": d["spec"].get("replicas", 1),
            "pdb": pdbs_for(d),
        })
    pools = sorted((w["service"], w["zone"]) for w in workers)
    f.check(pools == sorted((s, z) for s in SERVICES for z in ZONES), f"{where}: one worker pool per service and zone, got {pools}")
    f.check(len({w["key_secret"] for w in workers}) == len(workers), f"{where}: every pool has its own key")
    facts["workers"] = sorted(workers, key=lambda w: w["name"])

    # --- migrate
    job = get("Job", "migrate")
    if job:
        c = container(job, "migrate")
        f.check(c["args"] == ["migrate"], f"{where}: the Job runs `migrate`")
        ann = job["metadata"].get("annotations", {})
        wave = int(ann.get("argocd.argoproj.io/sync-wave", "0"))
        for d in kinds.get("Deployment", []):
            dw = int(d["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))
            f.check(dw > wave, f"{where}: Deployment/{d['metadata']['name']} must sync after the migrate Job (wave {dw} <= {wave})")
        f.check(job["spec"]["template"]["spec"]["restartPolicy"] == "Never", f"{where}: migrate restartPolicy Never")
        facts["migrate"] = {
            "args": c["args"],
            "hook": ann.get("argocd.argoproj.io/hook"),
            "wave": wave,
            "admin_key_secret": secret_ref(env_of(c).get("GATEWAY_ADMIN_KEY")),
            "stream_replicas": env_of(c).get("NATS_STREAM_REPLICAS", {}).get("value"),
            # It creates and updates the streams: the relay's user may, no other.
            "nats_user": check_nats_login(where, "migrate", c, "relay", f),
        }
    hooks = get("Deployment", "webhooks")
    if hooks:
        # The dispatcher reads the events stream through its consumer, as gateways do.
        facts["webhooks"] = {"nats_user": check_nats_login(where, "webhooks", container(hooks, "webhooks"), "gateway", f)}

    # --- NATS
    nats = get("StatefulSet", "nats")
    if nats:
        replicas = nats["spec"].get("replicas", 1)
        conf_volume = next(v for v in pod_spec(nats)["volumes"] if v["name"] == "config")
        # nats.conf and the users file it includes, projected into one directory.
        sources = conf_volume.get("projected", {}).get("sources", [{"configMap": conf_volume.get("configMap")}])
        conf_map = next((src["configMap"]["name"] for src in sources if src.get("configMap")), None)
        conf = objs.get(("ConfigMap", conf_map))
        auth = [(src["secret"]["name"], item["key"], item["path"]) for src in sources if src.get("secret")
                for item in src["secret"].get("items", [])]
        f.check((NATS_AUTH_SECRET, "auth.conf", "auth.conf") in auth, f"{where}: NATS must get the users file beside nats.conf (key auth.conf of Secret {NATS_AUTH_SECRET}, projected into its config volume), got {auth}")
        includes_auth = bool(conf) and re.search(r'^\s*include\s+"?auth\.conf"?\s*$', conf["data"]["nats.conf"], re.M) is not None
        f.check(includes_auth, f"{where}: nats.conf must include \"auth.conf\": the broker requires a login")
        routes = re.findall(r"nats-route://([\w.-]+):6222", conf["data"]["nats.conf"]) if conf else []
        expected = [f"nats-{i}.{nats['spec']['serviceName']}" for i in range(replicas)]
        f.check(routes == expected, f"{where}: NATS routes {routes} must name every pod {expected}")
        f.check("jetstream" in conf["data"]["nats.conf"] if conf else False, f"{where}: NATS runs JetStream")
        parsed = bool(conf) and check_nats_config(where, nats, conf["metadata"]["name"], conf["data"]["nats.conf"], f)
        facts["nats"] = {
            "config_parsed_by_nats_server": parsed,
            "users_file": [a for a in auth if a[0] == NATS_AUTH_SECRET][:1],
            "includes_users_file": includes_auth,
            "replicas": replicas,
            "routes": routes,
            "pdb": pdbs_for(nats),
            "hard_spread": sorted(spread_keys(pod_spec(nats), True)),
        }

    # --- PostgreSQL
    if cnpg:
        sync = cnpg["spec"].get("postgresql", {}).get("synchronous")
        facts["postgres"] = {
            "instances": cnpg["spec"]["instances"],
            "synchronous": sync,
            "app_secret": f"{cnpg['metadata']['name']}-app",
            "max_connections": int(cnpg["spec"].get("postgresql", {}).get("parameters", {}).get("max_connections", "100")),
        }
        # Connection budget: every gateway process at its pool size, at once.
        env_cm = next((d for d in kinds.get("ConfigMap", []) if d["metadata"]["name"].startswith("gateway-env")), None)
        default_pool = int((env_cm or {}).get("data", {}).get("DATABASE_MAX_CONNECTIONS", "20"))

        def pool(doc, name):
            return int(env_of(container(doc, name)).get("DATABASE_MAX_CONNECTIONS", {}).get("value", default_pool))

        if gw and hpa and relay and job:
            budget = hpa["spec"]["maxReplicas"] * pool(gw, "gateway") + relay["spec"].get("replicas", 1) * pool(relay, "relay") + pool(job, "migrate")
            hooks = get("Deployment", "webhooks")
            if hooks:
                budget += hooks["spec"].get("replicas", 1) * pool(hooks, "webhooks")
            facts["postgres"]["connection_budget"] = budget
            f.check(budget + 20 <= facts["postgres"]["max_connections"], f"{where}: gateways, relays and migrate may open {budget} connections; max_connections {facts['postgres']['max_connections']} leaves under 20 spare")
        # Every process that reaches PostgreSQL: the -rw Service's URL, over TLS verified
        # against the operator's CA.
        ca_secret = f"{cnpg['metadata']['name']}-ca"
        facts["postgres"]["ca_secret"] = ca_secret
        for doc, name in [(gw, "gateway"), (relay, "relay"), (job, "migrate"), (get("Deployment", "webhooks"), "webhooks")]:
            if not doc:
                continue
            db = database_url(doc, name)
            f.check(db is not None and db["secret"] == [facts["postgres"]["app_secret"], "uri"], f"{where}: {name}: DATABASE_URL must be the `uri` of {facts['postgres']['app_secret']} (the -rw Service), directly or as $(VAR) defined before it: {db}")
            f.check(db is not None and db["sslmode"] == "verify-full" and db["ca_secret"] == ca_secret, f"{where}: {name}: DATABASE_URL must ask for sslmode=verify-full with sslrootcert in a mounted {ca_secret} Secret: {db}")

    # --- monitoring
    rule = get("PrometheusRule", "gateway")
    if rule:
        alerts = yaml.safe_load(ALERTS.read_text())
        f.check(rule["spec"]["groups"] == alerts["groups"], f"{where}: PrometheusRule differs from {ALERTS.relative_to(ROOT)}: run scripts/validate-deploy.sh --sync-rules")
    dash = get("ConfigMap", "gateway-dashboard")
    if dash:
        f.check(dash["data"].get("gateway.json") == DASHBOARD.read_text(), f"{where}: the dashboard ConfigMap differs from deploy/grafana/gateway.json")
        f.check(dash["metadata"].get("labels", {}).get("grafana_dashboard") == "1", f"{where}: the dashboard ConfigMap needs grafana_dashboard: \"1\"")
    facts["monitoring"] = {
        "service_monitors": sorted(d["metadata"]["name"] for d in kinds.get("ServiceMonitor", [])),
        "pod_monitors": sorted(d["metadata"]["name"] for d in kinds.get("PodMonitor", [])),
        "prometheus_rules": sorted(d["metadata"]["name"] for d in kinds.get("PrometheusRule", [])),
        "dashboards": sorted(d["metadata"]["name"] for d in kinds.get("ConfigMap", []) if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"),
    }

    # --- what production promises beyond any overlay
    if production:
        g = facts.get("gateway", {})
        f.check(g.get("min_replicas", 0) >= 3, f"{where}: at least 3 gateways")
        f.check({ZONE_LABEL} <= set(g.get("hard_spread", [])) and HOST_LABEL in g.get("spread", []), f"{where}: gateways spread over zones (hard) and nodes")
        f.check(facts.get("relay", {}).get("replicas", 0) >= 2, f"{where}: at least 2 relays")
        f.check(facts.get("nats", {}).get("replicas") == 3, f"{where}: NATS has 3 nodes")
        f.check({ZONE_LABEL, HOST_LABEL} <= set(facts.get("nats", {}).get("hard_spread", [])), f"{where}: NATS nodes on distinct nodes, spread over zones")
        f.check(facts.get("migrate", {}).get("stream_replicas") == str(facts.get("nats", {}).get("replicas")), f"{where}: streams must have as many replicas as NATS has nodes (NATS_STREAM_REPLICAS on migrate)")
        p = facts.get("postgres", {})
        f.check(p.get("instances") == 3, f"{where}: PostgreSQL has 3 instances")
        f.check((p.get("synchronous") or {}).get("number", 0) >= 1 and (p.get("synchronous") or {}).get("dataDurability") == "required", f"{where}: PostgreSQL replicates synchronously (a 202 survives a failover)")
        ns = [d for d in kinds.get("Namespace", [])]
        f.check(ns and ns[0]["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") == "restricted", f"{where}: the namespace enforces the restricted Pod Security Standard")
    facts["objects"] = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    return facts


# ---------------------------------------------------------------------------------------
# compose.yaml


def check_compose(f):
    where = "compose.yaml"
    compose = yaml.safe_load(COMPOSE.read_text())
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    for e in errors[:10]:
        path = ".".join(str(p) for p in e.absolute_path)
        f.check(False, f"{where}: {path}: {e.message}")
    services = compose.get("services", {})
    volumes = set((compose.get("volumes") or {}).keys())
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}) or {}:
            f.check(dep in services, f"{where}: {name} depends on unknown service {dep}")
        for v in svc.get("volumes", []) or []:
            src = v.split(":")[0] if isinstance(v, str) else v.get("source")
            if src and not src.startswith((".", "/")):
                f.check(src in volumes, f"{where}: {name} mounts undeclared volume {src}")

    def is_worker(svc):
        """Runs the worker program: as the entrypoint, or exec'd by a shell wrapper."""
        entry = svc.get("entrypoint") or []
        entry = entry if isinstance(entry, list) else [entry]
        return entry[:1] == ["worker"] or any(re.search(r"\bexec worker\b", w) for w in entry)

    workers = {n: s for n, s in services.items() if is_worker(s)}
    f.check("WORKER_SERVICE" not in json.dumps({n: s for n, s in services.items() if n not in workers}), f"{where}: a service sets WORKER_SERVICE but is not recognized as a worker")
    keys_service = services.get("worker-keys")
    f.check(keys_service is not None, f"{where}: a worker-keys service must make the workers' keys")
    keys_script = " ".join(keys_service.get("command", []) if keys_service else [])
    pools = []
    for name, svc in sorted(workers.items()):
        env = svc.get("environment", {})
        label = f"{where}: {name}"
        f.check(isinstance(env, dict), f"{label}: environment must be a mapping")
        text = json.dumps(env)
        f.check("GATEWAY_ADMIN_KEY" not in text, f"{label}: a worker must not get the admin key")
        service, zone = env.get("WORKER_SERVICE"), env.get("WORKER_ZONE")
        f.check(env.get("GATEWAY_KEY_FILE") == f"/worker-keys/{service}-{zone}", f"{label}: GATEWAY_KEY_FILE must be its pool's key, /worker-keys/{service}-{zone}")
        f.check("GATEWAY_KEY" not in env, f"{label}: GATEWAY_KEY comes from GATEWAY_KEY_FILE")
        f.check(f"{service}:{zone}" in keys_script, f"{label}: worker-keys does not make a key for {service}/{zone}")
        f.check(svc.get("depends_on", {}).get("worker-keys", {}).get("condition") == "service_completed_successfully", f"{label}: must start after worker-keys")
        pools.append({"name": name, "service": service, "zone": zone, "key_file": env.get("GATEWAY_KEY_FILE")})
    f.check(sorted((p["service"], p["zone"]) for p in pools) == sorted((s, z) for s in SERVICES for z in ZONES), f"{where}: one worker per service and zone")
    return {"workers": pools, "services": sorted(services)}


# ---------------------------------------------------------------------------------------
# Commands


def cmd_check(args):
    facts_path = None
    if args[:1] == ["--facts"] and len(args) == 2:
        facts_path = Path(args[1])
    elif args:
        raise SystemExit(f"check: unexpected arguments {args}")
    cache_kubernetes_schemas()
    f = Failures()
    facts = {"kubernetes_version": KUBERNETES_VERSION, "overlays": {}}
    overlays = sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").exists())
    if not overlays:
        raise SystemExit(f"no overlays under {OVERLAYS}")
    for overlay in overlays:
        docs = render(overlay)
        before = len(f.messages)
        for d in docs:
            validate_object(d, f"overlays/{overlay.name}", f)
        facts["overlays"][overlay.name] = check_overlay(overlay.name, docs, f)
        status = "ok" if len(f.messages) == before else "FAILED"
        print(f"overlays/{overlay.name}: {len(docs)} objects rendered and validated against Kubernetes {KUBERNETES_VERSION}: {status}")
    before = len(f.messages)
    facts["compose"] = check_compose(f)
    print(f"compose.yaml: validated against the Compose Specification: {'ok' if len(f.messages) == before else 'FAILED'}")
    if facts_path:
        facts_path.parent.mkdir(parents=True, exist_ok=True)
        facts_path.write_text(json.dumps(facts, indent=1, sort_keys=True))
    for m in f.messages:
        print(f"ERROR {m}")
    if f.messages:
        print(f"{len(f.messages)} problem(s)")
        return 1
    return 0


RULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by `scripts/validate-deploy.sh --sync-rules`:
# edit alerts.yml, then run that. scripts/validate-deploy.sh fails while they differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: gateway
spec:
"""


def cmd_sync_rules(_args):
    lines = ALERTS.read_text().splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    body = "\n".join(("  " + line) if line.strip() else "" for line in lines)
    RULE_COPY.write_text(RULE_HEADER + body + "\n")
    copied = yaml.safe_load(RULE_COPY.read_text())
    assert copied["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    print(f"wrote {RULE_COPY.relative_to(ROOT)}")
    return 0


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def cmd_vendor_crd(args):
    for path in args:
        crd = yaml.safe_load(Path(path).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
            out = SCHEMAS / f"{kind.lower()}-{group}-{version['name']}.json"
            out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
            print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size} bytes)")
    return 0


def main(argv):
    commands = {"check": cmd_check, "sync-rules": cmd_sync_rules, "vendor-crd": cmd_vendor_crd}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
