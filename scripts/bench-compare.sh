#!/usr/bin/env bash
# Webhook throughput of two builds in the same run: BASE (a commit, built in
# a scratch worktree under target/) and the working tree, served side by side
# and loaded in turns (base, working tree, ceiling probe; ROUNDS times) with
# wrk -t1 and cache-hit reviews of the Porch function pod fixture. Prints
# reviews/s per round and the working tree's mean against the base's.
#
#   scripts/bench-compare.sh 16c154c   # ROUNDS=3 DURATION=10s CONNECTIONS=16
#   BASE_BIN=path/to/fn-image-resolver scripts/bench-compare.sh 16c154c
#                                      # a base already built
#   LOG_LEVEL=info scripts/bench-compare.sh cb423b1
#                                      # both at the default log level (error
#                                      # otherwise); logs go to files
#
# Needs docker-registry (scripts/install-test-deps.sh) and wrk (Debian).
set -euo pipefail
base=${1:?usage: scripts/bench-compare.sh BASE_COMMIT}
rounds=${ROUNDS:-3}
duration=${DURATION:-10s}
connections=${CONNECTIONS:-16}
reg=127.0.0.1:${REGISTRY_PORT:-15110}
log_level=${LOG_LEVEL:-error}
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 2; }
base_bin=${BASE_BIN:-}
if [ -z "$base_bin" ]; then
    wt=target/bench-base/$(git rev-parse --short "$base")
    [ -d "$wt" ] || git worktree add --detach "$wt" "$base" >/dev/null
    (cd "$wt" && CARGO_TARGET_DIR="$PWD/../../bench-base-target" cargo build --quiet --release --bin fn-image-resolver)
    base_bin=target/bench-base-target/release/fn-image-resolver
fi
cargo build --quiet --release --bin fn-image-resolver --example sample_registry --example ceiling_probe
head_bin=target/release/fn-image-resolver
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
target/release/examples/sample_registry "${reg#*:}" >"$work/registry.log" 2>&1 &
pids+=("$!")
for _ in $(seq 600); do grep -q '^ready' "$work/registry.log" && break; sleep 0.1; done
$head_bin certs --san 127.0.0.1 --out "$work/certs" >/dev/null
serve() { # binary port resolver-port
    MIMALLOC_ARENA_EAGER_COMMIT=0 "$1" serve --listen "127.0.0.1:$2" --tls-cert-file "$work/certs/tls.crt" \
        --tls-key-file "$work/certs/tls.key" --resolver-listen "127.0.0.1:$3" --insecure-registry "$reg" \
        --log-level "$log_level" 2>"$work/serve-$2.log" &
    pids+=("$!")
    until curl -sf "http://127.0.0.1:$3/readyz" >/dev/null; do sleep 0.01; done
}
serve "$base_bin" 18451 19551
serve "$head_bin" 18452 19552
target/release/examples/ceiling_probe 127.0.0.1:18453 "$work/certs/tls.crt" "$work/certs/tls.key" >"$work/probe.log" &
pids+=("$!")
for _ in $(seq 100); do grep -q '^ready' "$work/probe.log" && break; sleep 0.05; done
sed "s/{{REGISTRY}}/$reg/g; s/{{WRAPPER_REGISTRY}}/$reg/g" tests/fixtures/function-pod-review.json >"$work/review.json"
{ echo 'wrk.method = "POST"'; echo 'wrk.headers["Content-Type"] = "application/json"'
  printf 'wrk.body = [==[%s]==]\n' "$(cat "$work/review.json")"; } >"$work/post.lua"
for port in 18451 18452; do   # the one cold miss of each server
    curl -sf --cacert "$work/certs/ca.crt" -H 'content-type: application/json' \
        "https://127.0.0.1:$port/mutate?timeout=10s" -d @"$work/review.json" >/dev/null
done

echo "== $(date -u +%FT%TZ) base $(git rev-parse --short "$base") vs working tree $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $(nproc) cores; wrk -t1 -c$connections -d$duration, $rounds rounds, --log-level $log_level"
declare -A sum
for round in $(seq "$rounds"); do
    for target in "base:18451" "head:18452" "probe:18453"; do
        rps=$(wrk -t1 -c"$connections" -d"$duration" -s "$work/post.lua" \
            "https://127.0.0.1:${target##*:}/mutate?timeout=10s" | awk '/Requests\/sec/ {print $2}')
        printf '  round %s  %-6s %10s reviews/s\n' "$round" "${target%%:*}" "$rps"
        sum[${target%%:*}]=$(echo "${sum[${target%%:*}]:-0} + $rps" | bc -l)
    done
done
for t in base head probe; do
    printf '  mean   %-6s %10.0f reviews/s\n' "$t" "$(echo "${sum[$t]} / $rounds" | bc -l)"
done
printf '  working tree / base: %.3f; base / probe: %.3f; working tree / probe: %.3f\n' \
    "$(echo "${sum[head]} / ${sum[base]}" | bc -l)" \
    "$(echo "${sum[base]} / ${sum[probe]}" | bc -l)" \
    "$(echo "${sum[head]} / ${sum[probe]}" | bc -l)"
for port in 18451 18452; do
    printf '  log written by %s: %s lines, %s bytes\n' "$([ $port = 18451 ] && echo base || echo head)" \
        "$(wc -l <"$work/serve-$port.log")" "$(wc -c <"$work/serve-$port.log")"
done
