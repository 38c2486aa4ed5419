#!/usr/bin/env bash
# Installs go-containerregistry's `crane` at a pinned version for the
# differential test (tests/it/crane.rs), into a cache outside the repo keyed
# by version, from the Go module proxy (checksums verified by the Go
# checksum database). Prints the binary's path on its last line.
set -euo pipefail
version=v0.22.1
out="${FNIR_CRANE_CACHE:-$HOME/.cache/fn-image-resolver/crane}/$version"
if [ -x "$out/crane" ]; then
    echo "crane/build.sh: crane $version cached in $out" >&2
else
    start=$SECONDS
    echo "crane/build.sh: installing crane $version ..." >&2
    mkdir -p "$out"
    CGO_ENABLED=0 GOBIN="$out" go install -trimpath -ldflags='-s -w' \
        "github.com/google/go-containerregistry/cmd/crane@$version"
    echo "crane/build.sh: installed in $((SECONDS - start)) s" >&2
fi
echo "$out/crane"
