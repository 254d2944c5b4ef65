#!/usr/bin/env bash
# Verifies recorded webhook deliveries (a JSON file, see webhook-verify.py) with the
# Standard Webhooks reference library from PyPI, in a virtual environment this script
# makes ($WEBHOOK_VENV, default target/venv-webhooks). Used by the `webhooks::` tests.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${WEBHOOK_VENV:-${CARGO_TARGET_DIR:-target}/venv-webhooks}"
pins="standardwebhooks==1.0.0"
ready() { [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.pins" 2>/dev/null)" = "$pins" ]; }
if ! ready; then
    # Tests run in parallel: one makes the venv while the others wait for it (a
    # half-made venv failed the others' checks when two made it at once).
    mkdir -p "$(dirname "$venv")"
    exec 9>"$venv.lock"
    flock 9
    if ! ready; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check $pins
        echo "$pins" > "$venv/.pins"
    fi
    exec 9>&-
fi
exec "$venv/bin/python" scripts/webhook-verify.py "$1"
