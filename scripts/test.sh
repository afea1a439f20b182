#!/usr/bin/env bash
# Runs every check and test: fmt, clippy, buf lint and breaking, unit tests,
# the integration tests against real NATS, Redis, SQLite and a private
# Postgres, and the Python and TypeScript examples on generated clients.
# The tests start their own nats-server and redis-server per test on free
# ports; this script installs them and starts the shared Postgres (port 25432).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KAIROS_ROOT"

ensure_deps
# A fresh clone gains nothing from incremental artefacts but their disk space.
if [[ -n "${CI:-}" ]]; then export CARGO_INCREMENTAL=0; fi
log "cargo fmt --check"
cargo fmt --all --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "buf lint"
buf lint
released="$(find releases -mindepth 1 -maxdepth 1 -type d -name 'v*' | sort -V | tail -1)"
log "buf breaking against $released"
buf breaking --against "$released"

# The Python and TypeScript examples run against a live server in polyglot.rs.
"$KAIROS_ROOT/scripts/gen-clients.sh"
log "tsc (the TypeScript example and client)"
node_modules/.bin/tsc -p examples/typescript
export KAIROS_PYTHON="$KAIROS_TOOLS/venv/bin/python" KAIROS_TSX="$KAIROS_ROOT/node_modules/.bin/tsx"

PG_PORT=25432
start_postgres test-postgres "$PG_PORT"
trap 'stop_postgres test-postgres' EXIT
export KAIROS_TEST_DATABASE_URL="postgres://kairos@127.0.0.1:$PG_PORT/postgres"

# The process and command-line tests run the real worker and kairos binaries.
log "building kairos-worker and kairos"
cargo build --quiet -p kairos-worker --bin kairos-worker -p kairos-client --bin kairos
export KAIROS_WORKER_BIN="$KAIROS_ROOT/target/debug/kairos-worker"
export KAIROS_CLI_BIN="$KAIROS_ROOT/target/debug/kairos"

log "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
