#!/usr/bin/env bash
# Runs Kairos locally: private NATS, Redis (and Postgres with --postgres) under
# .kairos/, kairos-server on 127.0.0.1:50051 and a `log` worker for queue
# `default`. Ctrl-C stops everything it started.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

use_pg=""
for arg in "$@"; do
  case "$arg" in
    --postgres) use_pg=1 ;;
    *) die "usage: $0 [--postgres]" ;;
  esac
done

NATS_PORT=14222 REDIS_PORT=16379 PG_PORT=15432 GRPC_PORT=50051
ensure_deps
log "building (debug)"
cargo build --quiet --workspace --bins

pids=()
cleanup() {
  trap - INT TERM EXIT
  log "stopping"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  stop_pidfile "$KAIROS_DIR/dev-nats/nats.pid"
  stop_pidfile "$KAIROS_DIR/dev-redis/redis.pid"
  [ -n "$use_pg" ] && stop_postgres dev-postgres
  exit 0
}
trap cleanup INT TERM EXIT

start_nats dev-nats "$NATS_PORT"
start_redis dev-redis "$REDIS_PORT"
db_url="sqlite://$KAIROS_DIR/kairos.db"
if [ -n "$use_pg" ]; then
  start_postgres dev-postgres "$PG_PORT"
  db_url="postgres://kairos@127.0.0.1:$PG_PORT/postgres"
fi

cat >"$KAIROS_DIR/env" <<ENV
export KAIROS_SERVER=http://127.0.0.1:$GRPC_PORT
export KAIROS_LISTEN=127.0.0.1:$GRPC_PORT
export KAIROS_NATS_URL=nats://127.0.0.1:$NATS_PORT
export KAIROS_REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export KAIROS_DATABASE_URL=$db_url
export PATH="$KAIROS_ROOT/target/debug:\$PATH"
ENV
# shellcheck disable=SC1091
source "$KAIROS_DIR/env"

./target/debug/kairos-server &
pids+=($!)
wait_port 127.0.0.1 "$GRPC_PORT" 30 || die "kairos-server did not start"
./target/debug/kairos-worker --queue default --handler log &
pids+=($!)

cat <<MSG

Kairos is running: server on $KAIROS_SERVER, a log worker on queue "default".
In another terminal:
  source .kairos/env
  kairos schedule --queue default --in 5s --payload 'hello from kairos'
  kairos list
  kairos-worker --queue other --handler log     # more workers join the same stack
Ctrl-C stops everything.

MSG
wait -n "${pids[@]}"
