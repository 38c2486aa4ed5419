#!/usr/bin/env bash
# Benchmarks the resolver endpoint of `fn-image-resolver serve` (release
# build) with wrk over HTTP keep-alive on loopback: cache-hit throughput and
# client-side latency, the server-side latency histogram from /metrics, and
# what the registry saw. Bounded: one warm-up request, then DURATION of load.
#
#   scripts/bench-endpoint.sh            # DURATION=10s CONNECTIONS=16 THREADS=1
#
# Needs docker-registry (scripts/install-test-deps.sh) and wrk (apt-get install wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${DURATION:-10s}
connections=${CONNECTIONS:-16}
threads=${THREADS:-1}
reg_port=${REGISTRY_PORT:-15000}
port=${PORT:-19445}
cargo build --quiet --release --bin fn-image-resolver --example sample_registry
log=$(mktemp -d)
target/release/examples/sample_registry "$reg_port" >"$log/registry.log" 2>&1 &
reg_pid=$!
trap 'kill $reg_pid $srv_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$log"' EXIT
for _ in $(seq 100); do grep -q '^ready' "$log/registry.log" && break; sleep 0.1; done
target/release/fn-image-resolver serve --resolver-listen "127.0.0.1:$port" \
    --insecure-registry "127.0.0.1:$reg_port" --log-level warn 2>"$log/serve.log" &
srv_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
url="http://127.0.0.1:$port/v1/resolve?image=127.0.0.1:$reg_port/fns/set-namespace:v0.4"
curl -sf "$url" >/dev/null   # the one cold miss
echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== wrk -t$threads -c$connections -d$duration --latency (cache hits, keep-alive)"
wrk -t"$threads" -c"$connections" -d"$duration" --latency "$url"
echo "== server side (/v1/resolve latency histogram) and registry requests"
curl -sf "http://127.0.0.1:$port/metrics" | awk '
    /^fn_image_resolver_http_request_duration_seconds_bucket\{.*route="\/v1\/resolve"/ {
        match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5); b[le] = $NF; order[n++] = le }
    /^fn_image_resolver_http_request_duration_seconds_count\{.*route="\/v1\/resolve"/ { total = $NF }
    /^fn_image_resolver_registry_requests_total/ { print "  " $0 }
    END { for (i = 0; i < n; i++) if (order[i] + 0 <= 0.0004) printf "  <= %s s: %.4f%% of %d requests\n", order[i], 100 * b[order[i]] / total, total }'
