#!/usr/bin/env bash
# Builds the Kubernetes binaries the tests run from the pinned wrapper modules
# beside this script, into a cache outside the repo keyed by version, so only
# the first run on a machine pays for the build:
#
#   tests/k8s/build.sh          etcd and kube-apiserver (the API-only tests)
#   tests/k8s/build.sh --node   also kubelet, kube-controller-manager,
#                               kube-scheduler and kube-proxy (tests/cluster)
#
# Prints the directory that holds the binaries on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
k8s_version=$(awk '/^require k8s.io\/kubernetes/ {print $3}' "$here/kubernetes/go.mod")
etcd_version=$(awk '/^require go.etcd.io\/etcd\/server\/v3/ {print $3}' "$here/etcd/go.mod")
# "-v2": the binaries report their version (ldflags below); builds of the
# same modules without it are not reused.
out="${FNIR_K8S_CACHE:-$HOME/.cache/fn-image-resolver/k8s}/k8s-${k8s_version}_etcd-${etcd_version}-v2"
# What a release build stamps in, so that /version, `kubectl version` and
# the Node's kubeletVersion say which Kubernetes this is.
minor=$(echo "$k8s_version" | cut -d. -f2)
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags="$ldflags -X $pkg.gitTreeState=clean"
done
mkdir -p "$out"

build() { # name, module dir, package
    local name=$1 dir=$2 pkg=$3
    if [ -x "$out/$name" ]; then
        echo "k8s/build.sh: $name cached in $out" >&2
        return
    fi
    local start=$SECONDS
    echo "k8s/build.sh: building $name ($pkg) ..." >&2
    (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$out/$name.tmp" "$pkg")
    mv "$out/$name.tmp" "$out/$name"
    echo "k8s/build.sh: built $name in $((SECONDS - start)) s" >&2
}

build etcd "$here/etcd" .
build kube-apiserver "$here/kubernetes" k8s.io/kubernetes/cmd/kube-apiserver
if [ "${1:-}" = "--node" ]; then
    for cmd in kubelet kube-controller-manager kube-scheduler kube-proxy; do
        build "$cmd" "$here/kubernetes" "k8s.io/kubernetes/cmd/$cmd"
    done
fi
echo "$out"
