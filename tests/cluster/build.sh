#!/usr/bin/env bash
# Builds what tests/cluster/up.sh runs that Debian does not package: the
# Kubernetes binaries (tests/k8s/build.sh --node), a CoreDNS with the
# cluster's plugins (coredns/), the programs of the cluster's own images
# (testbin/) and crane, which pushes those images (tests/crane/build.sh).
# All from pinned Go modules, cached outside the repo keyed by version.
# Prints, on its last line, a directory with all of them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache="${FNIR_CLUSTER_CACHE:-$HOME/.cache/fn-image-resolver/cluster}"

k8s_dir=$("$here/../k8s/build.sh" --node | tail -n 1)
crane=$("$here/../crane/build.sh" | tail -n 1)

build() { # name, module dir: the module's main package, cached by the hash of its files
    local name=$1 dir=$2 key
    key=$(cat "$dir"/go.* "$dir"/*.go | sha256sum | cut -c1-16)
    local bin="$cache/$name-$key"
    if [ ! -x "$bin" ]; then
        local start=$SECONDS
        echo "cluster/build.sh: building $name ..." >&2
        mkdir -p "$cache"
        (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$bin.tmp" .)
        mv "$bin.tmp" "$bin"
        echo "cluster/build.sh: built $name in $((SECONDS - start)) s" >&2
    fi
    ln -sf "$bin" "$bin_dir/$name"
}

bin_dir="$cache/bin"
mkdir -p "$bin_dir"
for b in etcd kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy; do
    ln -sf "$k8s_dir/$b" "$bin_dir/$b"
done
ln -sf "$crane" "$bin_dir/crane"
build coredns "$here/coredns"
build testbin "$here/testbin"
echo "$bin_dir"
