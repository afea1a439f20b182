#!/usr/bin/env bash
# Generates the Python and TypeScript clients from proto/ into clients/python
# and clients/typescript (neither is committed). Installs the pinned
# generators first: grpcio-tools (examples/python/requirements.txt) into
# .kairos/tools/venv, protoc-gen-es and Connect (package.json) into node_modules.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$KAIROS_ROOT"
ensure_deps

python="$KAIROS_TOOLS/venv/bin/python"
"$python" -m pip install -q --disable-pip-version-check -r examples/python/requirements.txt

# npm keeps no lockfile here (it would record registry addresses); the exact
# pins in package.json are the lock. Reinstall only when package.json changes.
stamp="node_modules/.kairos-package-json"
if ! cmp -s package.json "$stamp" 2>/dev/null; then
  log "installing the TypeScript client's packages (package.json)"
  npm install --silent --no-package-lock --no-audit --no-fund >/dev/null
  cp package.json "$stamp"
fi

log "generating clients/python (grpcio-tools)"
rm -rf clients/python
mkdir -p clients/python
mapfile -t protos < <(find proto -name '*.proto' | sort)
"$python" -m grpc_tools.protoc -I proto \
  --python_out=clients/python --pyi_out=clients/python --grpc_python_out=clients/python \
  "${protos[@]}"

log "generating clients/typescript (buf generate, protoc-gen-es)"
buf generate
