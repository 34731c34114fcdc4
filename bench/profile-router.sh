#!/usr/bin/env bash
# Counts the user-space instructions each proxy executes per proxied
# request, with valgrind's callgrind, in one run: crossfade-router (80/20
# split over four backend ports), the agent's gate alone (in front of one
# backend port), nginx and HAProxy (the benchmark's configurations, one
# process, one thread). Each under callgrind in turn: 300 requests to warm
# up, then 2,000 measured ones at concurrency 1 over one kept-alive
# connection from a small Python client. Instruction counts do not depend
# on what else the machine is doing, so two builds can be compared on a
# noisy machine; kernel work is not in them (the benchmark's CPU figure
# has it). bench/RESULTS.md reports what this printed.
#
#   cargo build --release -p crossfade-bench && bench/profile-router.sh
#
# ONLY="router gate" measures those alone. KEEP=DIR keeps each profile as
# DIR/NAME.callgrind (callgrind_annotate FILE shows it). nginx and HAProxy
# are skipped, said so, when not installed (bench/install-peers.sh).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${BIN:-$here/../target/release/crossfade-bench}"
work="$(mktemp -d)"
requests=2000
only="${ONLY:-router gate nginx haproxy}"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
w1=$(port) w2=$(port) w3=$(port) w4=$(port)

cat > "$work/client.py" <<'EOF'
import http.client, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
body = b'{"model":"chat","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for _ in range(n):
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    assert response.status == 200, response.status
EOF

"$bin" __backend "$w1" "$w2" "$w3" "$w4" > "$work/backend.log" 2>&1 & pids+=($!)

declare -A counts
# measure NAME PORT COMMAND...: runs COMMAND under callgrind (instruments
# nothing until told), waits for PORT, warms up, counts the measured
# requests, stops it.
measure() {
    local name=$1 port=$2
    shift 2
    local out="$work/$name.callgrind"
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" "$@" \
        > "$work/$name.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    local up=""
    for _ in $(seq 300); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null; then
            up=1
            break
        fi
        sleep 0.2
    done
    if [ -z "$up" ]; then
        echo "$name did not listen on $port within 60 s; its log:" >&2
        tail -20 "$work/$name.log" >&2
        exit 1
    fi
    python3 "$work/client.py" 300 "$port"
    callgrind_control -i on "$pid" >/dev/null 2>&1
    python3 "$work/client.py" "$requests" "$port"
    callgrind_control -i off "$pid" >/dev/null 2>&1
    callgrind_control -d "$pid" >/dev/null 2>&1
    local dump
    dump=$(ls "$out".* 2>/dev/null | head -1)
    local total
    total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    counts[$name]=$((total / requests))
    echo "$name: $total instructions for $requests requests: ${counts[$name]} per request"
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP"
        cp "$dump" "$KEEP/$name.callgrind"
    fi
}

wants() { [[ " $only " == *" $1 "* ]]; }

if wants router; then
    public=$(port) admin=$(port) control=$(port)
    cat > "$work/router.toml" <<EOF
[control_tls]
insecure = true
[listen]
public = "127.0.0.1:$public"
admin = "127.0.0.1:$admin"
control = "127.0.0.1:$control"
[log]
filter = "warn"
[[endpoint]]
name = "chat"
[[endpoint.deployment]]
id = "v1"
weight = 80
workers = ["127.0.0.1:$w1", "127.0.0.1:$w2"]
[[endpoint.deployment]]
id = "v2"
weight = 20
workers = ["127.0.0.1:$w3", "127.0.0.1:$w4"]
EOF
    TOKIO_WORKER_THREADS=1 measure router "$public" "$bin" __router --config "$work/router.toml"
fi

if wants gate; then
    gate=$(port)
    TOKIO_WORKER_THREADS=1 measure gate "$gate" "$bin" __gate "$gate" "$w1"
fi

if wants nginx; then
    if command -v nginx >/dev/null; then
        listen=$(port)
        mkdir -p "$work/nginx"
        # The benchmark's configuration (bench/src/peers.rs), in one
        # process: no master.
        "$bin" __config nginx "$work/nginx" "$listen" "$w1" "$w2" "$w3" "$w4" > "$work/nginx/nginx.conf"
        measure nginx "$listen" nginx -e "$work/nginx/error.log" -p "$work/nginx" -c "$work/nginx/nginx.conf"
    else
        echo "nginx: skipped (not installed: bench/install-peers.sh)"
    fi
fi

if wants haproxy; then
    if command -v haproxy >/dev/null; then
        listen=$(port)
        "$bin" __config haproxy "$work" "$listen" "$w1" "$w2" "$w3" "$w4" > "$work/haproxy.cfg"
        measure haproxy "$listen" haproxy -db -f "$work/haproxy.cfg"
    else
        echo "haproxy: skipped (not installed: bench/install-peers.sh)"
    fi
fi

if [ -n "${counts[nginx]:-}" ]; then
    for name in router gate haproxy; do
        [ -n "${counts[$name]:-}" ] || continue
        awk -v n="$name" -v a="${counts[$name]}" -v b="${counts[nginx]}" \
            'BEGIN { printf "%s against nginx: %.2fx\n", n, a / b }'
    done
fi
