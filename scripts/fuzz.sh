#!/usr/bin/env bash
# Runs every fuzz target for a bounded time each (libFuzzer via cargo fuzz).
#
#   scripts/fuzz.sh              # 60 s per target
#   SECONDS_PER_TARGET=600 scripts/fuzz.sh reference admission
#
# Seeds come from fuzz/corpus/<target> (committed, read-only here); what the
# fuzzer finds goes to a scratch corpus under fuzz/target, and crashes to
# fuzz/artifacts/<target>. Needs a nightly toolchain (rustup) or, failing
# that, RUSTC_BOOTSTRAP on stable; installs cargo-fuzz if it is missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
per_target=${SECONDS_PER_TARGET:-60}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(reference reference_oracle docker_config admission registry_json www_authenticate)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi
"${fuzz[@]}" build -O
status=0
for target in "${targets[@]}"; do
    scratch=target/corpus/$target
    mkdir -p "$scratch"
    echo "== $target: ${per_target}s"
    if ! "${fuzz[@]}" run -O "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="$per_target" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        2>"target/$target.log"; then
        status=1
        echo "   FAILED: see fuzz/target/$target.log and fuzz/artifacts/$target/"
    fi
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+ +DONE' "target/$target.log" | sed 's/^/   /' || true
done
exit $status
