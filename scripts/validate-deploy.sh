#!/usr/bin/env bash
# Validates the deployment files offline: renders every Kubernetes overlay under
# deploy/kubernetes/overlays with `kubectl kustomize`, validates each object against the
# Kubernetes schemas (built-in kinds) or the vendored CRD schemas (CloudNativePG,
# Prometheus Operator), checks what the deployment promises, and validates compose.yaml
# against the Compose Specification. Details: scripts/validate-deploy.py.
#
#   scripts/validate-deploy.sh                  validate (tests/deploy_kubernetes.rs runs this)
#   scripts/validate-deploy.sh --facts FILE     … and write the checked facts as JSON
#   scripts/validate-deploy.sh --sync-rules     rewrite the PrometheusRule from alerts.yml
#
# Needs kubectl (with kustomize v5), python3 with venv, and nats-server (it parses the
# NATS configuration; scripts/services.sh installs it for the tests). The Python packages go into
# a virtual environment under target/ (made once, ~30 s; reused while the pins below
# stay the same). No cluster and no Docker engine are needed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: the schemas that kubernetes-validate ships are part of what is checked.
REQUIREMENTS="kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.3"
VENV=target/validate-deploy-venv

fail() { echo "validate-deploy: $*" >&2; exit 1; }

command -v kubectl >/dev/null 2>&1 || fail "kubectl is not installed. It renders the manifests (kubectl kustomize, kustomize v5). Install kubectl from the Kubernetes apt repository or your distribution (Debian's kubernetes-client 1.20 is too old)."
kustomize_version=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
[ -n "$kustomize_version" ] && [ "$kustomize_version" -ge 5 ] || fail "kubectl must bundle kustomize v5 or newer; \`kubectl version --client\` says: $(kubectl version --client 2>&1 | tr '\n' ' ')"
command -v nats-server >/dev/null 2>&1 || fail "nats-server is not installed; it checks the NATS configuration (scripts/services.sh installs it: Debian's nats-server)."
command -v python3 >/dev/null 2>&1 || fail "python3 is not installed (Debian: apt-get install python3 python3-venv)."

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/requirements" 2>/dev/null)" != "$REQUIREMENTS" ]; then
  echo "validate-deploy: installing $REQUIREMENTS into $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" || fail "python3 -m venv failed (Debian: apt-get install python3-venv)."
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $REQUIREMENTS \
    || fail "pip could not install $REQUIREMENTS"
  echo "$REQUIREMENTS" > "$VENV/requirements"
fi

case "${1:-}" in
  --sync-rules) exec "$VENV/bin/python" scripts/validate-deploy.py sync-rules ;;
  --facts) [ $# -eq 2 ] || fail "--facts needs a file name"; exec "$VENV/bin/python" scripts/validate-deploy.py check --facts "$2" ;;
  "") exec "$VENV/bin/python" scripts/validate-deploy.py check ;;
  *) fail "unknown argument $1 (see the top of $0)" ;;
esac
