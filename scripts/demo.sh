#!/usr/bin/env bash
# Quick start: starts a local registry with sample KRM function images and
# resolves them with fn-image-resolver. Needs docker-registry
# (scripts/install-test-deps.sh). PORT defaults to 5000.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-5000}
host=127.0.0.1:$port
cargo build --quiet --example sample_registry --bin fn-image-resolver
log=$(mktemp)
target/debug/examples/sample_registry "$port" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q '^ready' "$log" && break; sleep 0.1; done
grep -q '^ready' "$log" || { cat "$log"; exit 1; }
sed '/^ready/d' "$log"
echo
echo "\$ fn-image-resolver resolve --insecure-registry $host $host/fns/set-namespace:v0.4 $host/fns/multi-arch:v1 $host/fns/nope:v1"
target/debug/fn-image-resolver resolve --insecure-registry "$host" \
    "$host/fns/set-namespace:v0.4" "$host/fns/multi-arch:v1" "$host/fns/nope:v1" || echo "(exit $?: one image failed, as expected)"
