#!/usr/bin/env bash
# Installs what the tests run against from Debian: docker-registry
# (distribution 2.8), htpasswd, curl, promtool (package prometheus) for
# the alert rules' unit tests, and the node of the test cluster
# (tests/cluster/up.sh): containerd, runc, the CNI plugins, iptables,
# conntrack, iproute2, openssl. Then checks for what Debian does not
# provide at the versions needed, and says how to get it: Go >= 1.24 (the
# tests build kube-apiserver and etcd from Go modules, tests/k8s/build.sh,
# and install go-containerregistry's crane, tests/crane/build.sh)
# and kubectl. Needs root (or sudo) for apt; does nothing when all is there.
#
# FNIR_QUICKSTART=1 (scripts/quickstart.sh): only what the quick start runs,
# docker-registry, curl and python3.
set -euo pipefail

packages=()
command -v docker-registry >/dev/null || packages+=(docker-registry)
command -v curl >/dev/null || packages+=(curl ca-certificates)
command -v python3 >/dev/null || packages+=(python3)
if [ -z "${FNIR_QUICKSTART:-}" ]; then
    command -v htpasswd >/dev/null || packages+=(apache2-utils)
    command -v promtool >/dev/null || packages+=(prometheus)
    command -v containerd >/dev/null || packages+=(containerd)
    command -v runc >/dev/null || packages+=(runc)
    [ -x /usr/lib/cni/bridge ] || packages+=(containernetworking-plugins)
    command -v iptables >/dev/null || packages+=(iptables)
    command -v conntrack >/dev/null || packages+=(conntrack)
    command -v ip >/dev/null || packages+=(iproute2)
    command -v openssl >/dev/null || packages+=(openssl)
    command -v nsenter >/dev/null || packages+=(util-linux)
fi
if [ ${#packages[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    # The package starts its own service on :5000 where systemd runs; the
    # tests start their own registries, so stop it to free the port.
    # Prometheus and containerd likewise (only promtool is used; the test
    # cluster runs a containerd of its own).
    for service in docker-registry prometheus containerd; do
        if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
            $sudo systemctl disable --now "$service" || true
        fi
    done
fi

# The quick start needs only the Debian part.
[ -z "${FNIR_QUICKSTART:-}" ] || exit 0

missing=0
go_version=$(go env GOVERSION 2>/dev/null || true)   # e.g. go1.26.8
if [ -z "$go_version" ]; then
    echo "missing: Go >= 1.24, to build kube-apiserver, etcd and crane for the tests." >&2
    echo "  Install it from https://go.dev/dl/ (Debian 12's golang is 1.19, too old)." >&2
    missing=1
else
    minor=$(echo "$go_version" | sed -E 's/^go1\.([0-9]+).*/\1/')
    if ! [ "$minor" -ge 24 ] 2>/dev/null; then
        echo "too old: $go_version; the end-to-end tests need Go >= 1.24 (https://go.dev/dl/)." >&2
        missing=1
    fi
fi
if ! command -v kubectl >/dev/null; then
    echo "missing: kubectl, which the tests use to apply deploy/ and webhook-config/." >&2
    echo "  Install it from https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/ (any 1.30+)." >&2
    missing=1
fi
exit "$missing"
