#!/usr/bin/env bash
# Resident memory of `fn-image-resolver serve` with 10k and 100k cached
# images (release build, loopback only, bounded by N).
#
#   scripts/bench-memory.sh            # N="10000 100000"
#   FNIR_BENCH_STORAGE=/var/tmp/fnir-tags N=100000 scripts/bench-memory.sh
#                                      # keep the pushed tags for the next run
#
# Needs docker-registry (scripts/install-test-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --bin fn-image-resolver --example cache_memory
bin=target/release/fn-image-resolver
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $(nproc) cores"
for n in ${N:-10000 100000}; do
    reg_port=15200 resolver_port=19547
    MIMALLOC_ARENA_EAGER_COMMIT=${MIMALLOC_ARENA_EAGER_COMMIT:-0} $bin serve \
        --resolver-listen "127.0.0.1:$resolver_port" --insecure-registry "127.0.0.1:$reg_port" \
        --cache-capacity $((n + 1000)) --max-batch 100 --log-level error &
    pid=$!
    until curl -sf "http://127.0.0.1:$resolver_port/readyz" >/dev/null; do sleep 0.05; done
    idle=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    target/release/examples/cache_memory "$reg_port" "http://127.0.0.1:$resolver_port" "$n"
    entries=$(curl -sf "http://127.0.0.1:$resolver_port/metrics" | awk '/^fn_image_resolver_cache_entries / {print $2}')
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    echo "  N=$n: cache entries $entries; RSS idle $idle kB, with the entries $rss kB; $(( (rss - idle) * 1024 / n )) bytes per entry"
    kill "$pid"; wait "$pid" 2>/dev/null || true
done
