#!/usr/bin/env bash
# Where the heap of a filled cache goes: bytes asked for against bytes the
# allocator handed out (its size classes), by size, with N cached images.
#
#   N=20000 scripts/alloc-accounting.sh
#
# Builds a scratch worktree of HEAD (committed code only) under target/ whose
# global allocator is scripts/alloc-accounting/counting.rs, a counting
# wrapper around mimalloc. The crate forbids unsafe code, so the wrapper
# never lands in the product; the scratch copy allows it. Release without
# LTO: a faster build, and allocation sizes do not depend on it. Loopback
# only; needs docker-registry. FNIR_BENCH_STORAGE keeps pushed tags between
# runs (see examples/cache_memory.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${N:-20000}
root=$PWD
work=$root/target/alloc-accounting
git worktree remove --force "$work/src" 2>/dev/null || true
mkdir -p "$work"
git worktree add --detach --force "$work/src" HEAD >/dev/null
trap 'git -C "$root" worktree remove --force "$work/src"' EXIT
cd "$work/src"
grep -q '^static ALLOCATOR: mimalloc::MiMalloc' src/main.rs
grep -q '^mimalloc = .*features = \["v2"\]' Cargo.toml
sed -i '/^#\[global_allocator\]$/,+1d' src/main.rs
sed -i 's/^    fn_image_resolver::cli::run()$/    accounting::report_in_background();\n&/' src/main.rs
cat "$root/scripts/alloc-accounting/counting.rs" >> src/main.rs
sed -i 's/^unsafe_code = "forbid"/unsafe_code = "allow"/' Cargo.toml
sed -i 's/^\(mimalloc = .*\)features = \["v2"\]/\1features = ["v2", "extended"]/' Cargo.toml
export CARGO_TARGET_DIR=$work/target CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
# Not --locked: mimalloc's "extended" feature adds to the scratch lock file.
cargo build --quiet --release --bin fn-image-resolver --example cache_memory
bin=$CARGO_TARGET_DIR/release/fn-image-resolver
report=$work/report.txt
rm -f "$report"
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) N=$n"
reg_port=15200 resolver_port=19547
FNIR_ALLOC_REPORT=$report MIMALLOC_ARENA_EAGER_COMMIT=0 $bin serve \
    --resolver-listen "127.0.0.1:$resolver_port" --insecure-registry "127.0.0.1:$reg_port" \
    --cache-capacity $((n + 1000)) --max-batch 100 --log-level error &
pid=$!
until curl -sf "http://127.0.0.1:$resolver_port/readyz" >/dev/null; do sleep 0.05; done
"$CARGO_TARGET_DIR/release/examples/cache_memory" "$reg_port" "http://127.0.0.1:$resolver_port" "$n" >/dev/null
sleep 3
cat "$report"
grep -E 'RssAnon|RssFile' "/proc/$pid/status"
kill "$pid"; wait "$pid" 2>/dev/null || true
