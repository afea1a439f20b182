#!/usr/bin/env bash
# Benchmarks Kairos against raw JetStream on the same private NATS server, in
# the same run: ./scripts/bench.sh [SCENARIO] [ARGS]
#   SCENARIO: ingest | burst | steady | cancel | limited | idle | durable | all (default)
#   --durable   NATS with `sync_interval: always` (fsync before every ack);
#               implied by the durable scenario
#   --postgres  Postgres (a private one on port 25433) instead of SQLite
#   any other argument goes to kairos-bench (e.g. --tasks 1000000 --plot burst.png)
# KAIROS_SERVER_BIN and KAIROS_BENCH_BIN run other kairos-server and
# kairos-bench (worker) builds (e.g. copies of older ones, to compare two
# builds back to back on the same servers).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KAIROS_ROOT"

sync=default postgres=no args=()
for arg in "$@"; do
  case "$arg" in
    --durable) sync=always ;;
    --postgres) postgres=yes ;;
    durable) sync=always args+=("$arg") ;;
    *) args+=("$arg") ;;
  esac
done

ensure_deps
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || apt_install fonts-dejavu-core
log "building (release)"
cargo build --release --quiet -p kairos-server -p kairos-bench

# Fresh servers for every run, so the figures do not depend on earlier data.
name="bench-nats-$sync"
NATS_PORT=24222 REDIS_PORT=26379 PG_PORT=25433
stop_pidfile "$KAIROS_DIR/$name/nats.pid" "$NATS_PORT"
stop_pidfile "$KAIROS_DIR/bench-redis/redis.pid" "$REDIS_PORT"
rm -rf "$KAIROS_DIR/$name" "$KAIROS_DIR/bench-redis"
start_nats "$name" "$NATS_PORT" "$sync"
start_redis bench-redis "$REDIS_PORT"
cleanup() {
  stop_pidfile "$KAIROS_DIR/$name/nats.pid"
  stop_pidfile "$KAIROS_DIR/bench-redis/redis.pid"
  [ "$postgres" = no ] || stop_postgres bench-postgres
}
trap cleanup EXIT
if [ "$postgres" = yes ]; then
  start_postgres bench-postgres "$PG_PORT"
  args+=(--postgres-url "postgres://kairos@127.0.0.1:$PG_PORT/postgres"
    --postgres-pid-file "$KAIROS_DIR/bench-postgres/data/postmaster.pid")
fi

"${KAIROS_BENCH_BIN:-target/release/kairos-bench}" \
  --nats-url "nats://127.0.0.1:$NATS_PORT" --nats-sync "$sync" \
  --nats-conf "$KAIROS_DIR/$name/nats.conf" --nats-pid-file "$KAIROS_DIR/$name/nats.pid" \
  --redis-pid-file "$KAIROS_DIR/bench-redis/redis.pid" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT" \
  --server-bin "${KAIROS_SERVER_BIN:-target/release/kairos-server}" "${args[@]}"
