#!/usr/bin/env bash
# Two regions on this machine, as two sites would run them (see README, "Regions").
#
# Region 1 owns zone-a and zone-b, region 2 owns zone-c. Each is a whole installation:
# its own database (on the local PostgreSQL), its own authenticated NATS server with
# JetStream (in the domain r1 or r2), and a `gateway up` (API, relay, reconciler,
# webhook dispatcher, simulated workers for its own zones). The two NATS servers are
# linked as NATS leaf nodes (region 2's connects to region 1's), which carries the
# replication of global data: tenants, API keys, catalog, quotas, webhooks, resource types.
#
# Environment:
#   REGION_1_LISTEN, REGION_2_LISTEN  the gateways' addresses (127.0.0.1:8080, 127.0.0.1:8081)
#   GATEWAY_ADMIN_KEY                 the admin key of both regions (made and printed if unset)
#   PG_BASE                           PostgreSQL, without a database (postgres://postgres@127.0.0.1:5432)
#   REGION_1_DATABASE, REGION_2_DATABASE  their databases (gateway_region_1, gateway_region_2; made if missing)
#   REGION_LEAF_PORT                  region 1's port for region 2's NATS link (7422)
#   REGIONS_DATA_DIR                  where each region keeps its NATS users and store (.gateway/regions)
#   GATEWAY_BIN                       a built gateway binary (default: cargo build --release)
# Ctrl-C or SIGTERM stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

REGION_1_LISTEN=${REGION_1_LISTEN:-127.0.0.1:8080}
REGION_2_LISTEN=${REGION_2_LISTEN:-127.0.0.1:8081}
PG_BASE=${PG_BASE:-postgres://postgres@127.0.0.1:5432}
REGION_LEAF_PORT=${REGION_LEAF_PORT:-7422}
REGIONS_DATA_DIR=${REGIONS_DATA_DIR:-.gateway/regions}
REGION_1_DATABASE=${REGION_1_DATABASE:-gateway_region_1}
REGION_2_DATABASE=${REGION_2_DATABASE:-gateway_region_2}

if [[ -z "${GATEWAY_BIN:-}" ]]; then
    cargo build --release --locked --bin gateway
    GATEWAY_BIN=target/release/gateway
fi
if [[ -z "${GATEWAY_ADMIN_KEY:-}" ]]; then
    GATEWAY_ADMIN_KEY="gw_$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    echo "GATEWAY_ADMIN_KEY=$GATEWAY_ADMIN_KEY   (made now; the admin key of both regions)"
fi
export GATEWAY_ADMIN_KEY
mkdir -p "$REGIONS_DATA_DIR/r1" "$REGIONS_DATA_DIR/r2"
# The password region 2's NATS server logs in to region 1's with (kept across runs).
LEAF_PASSWORD_FILE="$REGIONS_DATA_DIR/leaf.password"
if [[ ! -s "$LEAF_PASSWORD_FILE" ]]; then
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$LEAF_PASSWORD_FILE")
fi
LEAF_PASSWORD=$(cat "$LEAF_PASSWORD_FILE")

for db in "$REGION_1_DATABASE" "$REGION_2_DATABASE"; do
    psql "$PG_BASE/postgres" -qtAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
        || psql "$PG_BASE/postgres" -qc "CREATE DATABASE $db"
done

pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

# region NAME LISTEN DATABASE ZONES PEER [VAR=VALUE…]: one `gateway up`.
region() {
    local name=$1 listen=$2 database=$3 zones=$4 peer=$5
    shift 5
    env -u NATS_URL \
        DATABASE_URL="$PG_BASE/$database" \
        GATEWAY_LISTEN="$listen" \
        GATEWAY_PUBLIC_URL="http://$listen" \
        GATEWAY_DATA_DIR="$REGIONS_DATA_DIR/$name" \
        GATEWAY_REGION="$name" \
        GATEWAY_REGION_ZONES="$zones" \
        GATEWAY_REGION_PEERS="$peer" \
        "$@" "$GATEWAY_BIN" up > >(sed -u "s/^/[$name] /") 2>&1 &
    pids+=($!)
}

region r1 "$REGION_1_LISTEN" "$REGION_1_DATABASE" zone-a,zone-b r2 \
    GATEWAY_UP_LEAF_PORT="$REGION_LEAF_PORT" GATEWAY_UP_LEAF_PASSWORD="$LEAF_PASSWORD"
region r2 "$REGION_2_LISTEN" "$REGION_2_DATABASE" zone-c r1 \
    GATEWAY_UP_LEAF_REMOTES="nats-leaf://leaf:$LEAF_PASSWORD@127.0.0.1:$REGION_LEAF_PORT"

echo "Region r1 (zone-a, zone-b): http://$REGION_1_LISTEN    Region r2 (zone-c): http://$REGION_2_LISTEN"
echo "Stop: Ctrl-C"
wait -n "${pids[@]}" || true
echo "a region stopped; stopping the other" >&2
