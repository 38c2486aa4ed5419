#!/usr/bin/env bash
# Builds kube-apiserver and etcd for the end-to-end tests from the pinned wrapper
# modules beside this script, into a cache outside the repo keyed by version, so
# only the first run on a machine pays for the build.
# Prints the directory that holds the binaries on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
k8s_version=$(awk '/^require k8s.io\/kubernetes/ {print $3}' "$here/apiserver/go.mod")
etcd_version=$(awk '/^require go.etcd.io\/etcd\/server\/v3/ {print $3}' "$here/etcd/go.mod")
out="${FNIR_K8S_CACHE:-$HOME/.cache/fn-image-resolver/k8s}/k8s-${k8s_version}_etcd-${etcd_version}"
mkdir -p "$out"

build() { # name, module dir, package
    local name=$1 dir=$2 pkg=$3
    if [ -x "$out/$name" ]; then
        echo "k8s/build.sh: $name cached in $out" >&2
        return
    fi
    local start=$SECONDS
    echo "k8s/build.sh: building $name ($pkg) ..." >&2
    (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$out/$name.tmp" "$pkg")
    mv "$out/$name.tmp" "$out/$name"
    echo "k8s/build.sh: built $name in $((SECONDS - start)) s" >&2
}

build etcd "$here/etcd" .
build kube-apiserver "$here/apiserver" k8s.io/kubernetes/cmd/kube-apiserver
echo "$out"
