#!/usr/bin/env bash
# Counts the instructions crossfade-router executes per proxied request,
# with valgrind's callgrind: the bench's backend on four ports, the router
# under callgrind, 300 requests to warm up, then 2,000 measured ones at
# concurrency 1 from a small Python client. Instruction counts do not
# depend on what else the machine is doing, so two builds can be compared
# on a noisy machine. bench/RESULTS.md reports what this printed.
#
#   cargo build --release -p crossfade-bench && bench/profile-router.sh
#
# KEEP=FILE keeps the profile (callgrind_annotate FILE shows it).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${BIN:-$here/../target/release/crossfade-bench}"
work="$(mktemp -d)"
OUT="$work/callgrind.out"
requests=2000
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
w1=$(port) w2=$(port) w3=$(port) w4=$(port) public=$(port) admin=$(port) control=$(port)

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

cat > "$work/client.py" <<'EOF'
import http.client, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
body = b'{"model":"chat","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
connection = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    assert response.status == 200, response.status
EOF

"$bin" __backend "$w1" "$w2" "$w3" "$w4" & pids+=($!)
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$OUT" "$bin" __router --config "$work/router.toml" \
    > "$work/router.log" 2>&1 & router=$!
pids+=("$router")
for _ in $(seq 150); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $public))" 2>/dev/null && break
    sleep 0.2
done
python3 "$work/client.py" 300 "$public"
callgrind_control -i on "$router" >/dev/null 2>&1
python3 "$work/client.py" "$requests" "$public"
callgrind_control -i off "$router" >/dev/null 2>&1
callgrind_control -d "$router" >/dev/null 2>&1
total=$(callgrind_annotate "$OUT".1 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "instructions: $total for $requests requests: $((total / requests)) per request"
if [ -n "${KEEP:-}" ]; then
    cp "$OUT".1 "$KEEP"
    echo "profile kept in $KEEP"
fi
