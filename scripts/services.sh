#!/usr/bin/env bash
# Starts the local PostgreSQL and NATS (with JetStream) if they are not running, and
# waits until both accept connections. Idempotent; used by .ci/run and handy by hand.
set -euo pipefail

# A machine without the servers gets them from Debian's packages.
missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
# promtool checks the metrics exposition and the alert rules in the tests.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# openssl makes the certificates of the broker's TLS test.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# scripts/contract.sh makes a Python virtual environment for schemathesis.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    # Tests and the defaults connect as `postgres` over loopback without a password.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    done
  fi
fi

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
nats_up() { (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; }

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  else
    echo "PostgreSQL is not running on 127.0.0.1:5432 and pg_ctlcluster is not installed" >&2
  fi
fi
if ! nats_up; then
  if command -v nats-server >/dev/null 2>&1; then
    echo "starting NATS with JetStream"
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
      -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  else
    echo "NATS is not running on 127.0.0.1:4222 and nats-server is not installed" >&2
  fi
fi
for _ in $(seq 1 60); do
  if pg_up && nats_up; then exit 0; fi
  sleep 0.5
done
pg_up || echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
nats_up || echo "NATS did not come up on 127.0.0.1:4222" >&2
exit 1
