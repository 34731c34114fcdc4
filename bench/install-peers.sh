#!/usr/bin/env bash
# Installs the peers the benchmark compares the router with: nginx and
# HAProxy from Debian's packages, and the Rust LLM routers shipped as Python
# wheels (sglang-router, vllm-router) into a virtual environment at
# bench/.venv. Each install is attempted on its own; the benchmark skips,
# with a note, any peer that is missing.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="${CROSSFADE_BENCH_VENV:-$here/.venv}"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

echo "== apt: nginx haproxy"
if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
    $sudo apt-get update -qq
    # nginx-light: the proxy module without the extras; its package starts
    # no service when there is no init system, and the benchmark runs its
    # own instance with its own configuration.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        nginx-light haproxy || echo "apt-get install failed: nginx/HAProxy will be skipped"
fi
command -v nginx >/dev/null && nginx -v 2>&1
command -v haproxy >/dev/null && haproxy -v | head -1

echo "== pip: sglang-router vllm-router into $venv"
python3 -m venv "$venv" || { echo "python3 -m venv failed: the Python routers will be skipped"; exit 0; }
"$venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1
for wheel in sglang-router vllm-router; do
    "$venv/bin/pip" install -q "$wheel" \
        && "$venv/bin/pip" show "$wheel" | grep -E '^(Name|Version)' \
        || echo "pip install $wheel failed: it will be skipped"
done
