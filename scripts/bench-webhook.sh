#!/usr/bin/env bash
# Admission webhook benchmarks (release builds, loopback only, bounded):
#  1. ceiling: a bare axum+rustls handler (examples/ceiling_probe.rs) vs
#     `fn-image-resolver serve`, same load generator, same run: cache-hit reviews;
#  2. herd: 200 concurrent cold reviews for one image on a fresh server;
#  3. mix: 95% cached reviews, 5% with an image never asked for before;
#  4. the same mix with every registry request delayed 100 ms (a proxy);
#  5. registry down with a warm cache;
#  plus startup time (exec -> /readyz) and resident memory. Scenario 1 runs
#  with our loadgen and, when installed, with wrk (Debian package wrk).
#
#   scripts/bench-webhook.sh     # DURATION=10s CONNECTIONS=16
#
# Needs docker-registry (scripts/install-test-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${DURATION:-10s}
connections=${CONNECTIONS:-16}
reg=127.0.0.1:${REGISTRY_PORT:-15100}
cargo build --quiet --release --bin fn-image-resolver --example sample_registry --example loadgen --example ceiling_probe --example slow_proxy
bin=target/release/fn-image-resolver
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# BURST_TAGS fresh images for the mix scenarios (a cold miss each).
target/release/examples/sample_registry "${reg#*:}" "${BURST_TAGS:-10000}" >"$work/registry.log" 2>&1 &
reg_pid=$!; pids+=("$reg_pid")
for _ in $(seq 1200); do grep -q '^ready' "$work/registry.log" && break; sleep 0.1; done
$bin certs --san 127.0.0.1 --out "$work/certs" >/dev/null

start_serve() { # name port resolver-port
    local t0 t1
    t0=$(date +%s%N)
    MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-0} $bin serve --listen "127.0.0.1:$2" --tls-cert-file "$work/certs/tls.crt" --tls-key-file "$work/certs/tls.key" \
        --resolver-listen "127.0.0.1:$3" --insecure-registry "$reg" --log-level error &
    pids+=("$!"); eval "$1_pid=$!"
    until curl -sf "http://127.0.0.1:$3/readyz" >/dev/null; do sleep 0.005; done
    t1=$(date +%s%N)
    echo "  $1: exec -> ready in $(( (t1 - t0) / 1000000 )) ms"
}
rss() { awk '/VmRSS/ {print $2 " kB"}' "/proc/$1/status"; }
load() { target/release/examples/loadgen --ca-file "$work/certs/ca.crt" --registry "$reg" "$@"; }
registry_requests() { curl -sf "http://127.0.0.1:$1/metrics" | grep '^fn_image_resolver_registry_requests_total' | sed 's/^/    /'; }

echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== startup"
start_serve main 18443 19545
echo "  main: RSS idle $(rss "$main_pid")"
target/release/examples/ceiling_probe 127.0.0.1:18444 "$work/certs/tls.crt" "$work/certs/tls.key" >"$work/probe.log" &
pids+=("$!")
for _ in $(seq 100); do grep -q '^ready' "$work/probe.log" && break; sleep 0.05; done
load --url "https://127.0.0.1:18443/mutate?timeout=10s" --requests 1 --concurrency 1 >/dev/null   # the one cold miss

echo "== 1. cache-hit reviews, $connections connections, $duration each"
echo -n "  ceiling probe:      "; load --url "https://127.0.0.1:18444/mutate?timeout=10s" --concurrency "$connections" --duration "$duration"
echo -n "  fn-image-resolver:  "; load --url "https://127.0.0.1:18443/mutate?timeout=10s" --concurrency "$connections" --duration "$duration"
if command -v wrk >/dev/null; then
    # wrk (C, one thread) leaves more of the 2 cores to the servers than our
    # loadgen does, so the ratio it shows is closer to the servers' own costs.
    sed "s/{{REGISTRY}}/$reg/g; s/{{WRAPPER_REGISTRY}}/$reg/g" tests/fixtures/function-pod-review.json >"$work/review.json"
    { echo 'wrk.method = "POST"'; echo 'wrk.headers["Content-Type"] = "application/json"'
      printf 'wrk.body = [==[%s]==]\n' "$(cat "$work/review.json")"; } >"$work/post.lua"
    for target in "ceiling probe:18444" "fn-image-resolver:18443"; do
        printf '  wrk -t1 -c%s, %-18s' "$connections" "${target%%:*}:"
        wrk -t1 -c"$connections" -d"$duration" -s "$work/post.lua" --latency \
            "https://127.0.0.1:${target##*:}/mutate?timeout=10s" |
            awk '/Requests\/sec/ {rps = $2} /^ +99%/ {p99 = $2} /Non-2xx/ {bad = $NF}
                 END {printf "%s reviews/s, p99 %s, non-2xx %d\n", rps, p99, bad}'
    done
fi
echo "  main: RSS after load $(rss "$main_pid")"
echo "  server-side /mutate latency (histogram):"
curl -sf "http://127.0.0.1:19545/metrics" | awk '
    /^fn_image_resolver_http_request_duration_seconds_bucket\{.*route="\/mutate"/ {
        match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5); b[le] = $NF; order[n++] = le }
    /^fn_image_resolver_http_request_duration_seconds_count\{.*route="\/mutate"/ { total = $NF }
    END { for (i = 0; i < n; i++) if (order[i] + 0 <= 0.0004) printf "    <= %s s: %.3f%% of %d\n", order[i], 100 * b[order[i]] / total, total }'
echo "  registry requests for all of it:"; registry_requests 19545

echo "== 2. herd: 200 concurrent cold reviews on a fresh server"
start_serve herd 18445 19546
load --url "https://127.0.0.1:18445/mutate?timeout=10s" --concurrency 200 --requests 200
echo "  registry requests (two images per pod: function + init container):"; registry_requests 19546

total_registry_requests() { curl -sf "http://127.0.0.1:$1/metrics" | awk '/^fn_image_resolver_registry_requests_total/ {n += $NF} END {print n + 0}'; }

echo "== 3. mix: 95% cached, 5% fresh images, $connections connections, $duration"
before=$(total_registry_requests 19545)
load --url "https://127.0.0.1:18443/mutate?timeout=10s" --concurrency "$connections" --duration "$duration" --fresh-percent 5
echo "  registry requests during the mix: $(( $(total_registry_requests 19545) - before ))"

echo "== 4. the same mix, every registry request delayed 100 ms"
target/release/examples/slow_proxy "http://$reg" 100 >"$work/proxy.log" 2>&1 &
pids+=("$!")
for _ in $(seq 100); do grep -q '^ready' "$work/proxy.log" && break; sleep 0.05; done
slow=$(awk '/^ready/ {print $2}' "$work/proxy.log")
t0=$(date +%s%N)
MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-0} $bin serve --listen 127.0.0.1:18446 --tls-cert-file "$work/certs/tls.crt" --tls-key-file "$work/certs/tls.key" \
    --resolver-listen 127.0.0.1:19548 --insecure-registry "$slow" --log-level error &
pids+=("$!")
until curl -sf "http://127.0.0.1:19548/readyz" >/dev/null; do sleep 0.005; done
target/release/examples/loadgen --ca-file "$work/certs/ca.crt" --registry "$slow" --url "https://127.0.0.1:18446/mutate?timeout=10s" --requests 1 --concurrency 1 | sed 's/^/  first (cold) review: /'
target/release/examples/loadgen --ca-file "$work/certs/ca.crt" --registry "$slow" --url "https://127.0.0.1:18446/mutate?timeout=10s" \
    --concurrency "$connections" --duration "$duration" --fresh-percent 5

echo "== 5. registry down, warm cache"
kill "$reg_pid"; sleep 0.5
echo -n "  fn-image-resolver:  "; load --url "https://127.0.0.1:18443/mutate?timeout=10s" --concurrency "$connections" --duration 5s
