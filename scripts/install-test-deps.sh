#!/usr/bin/env bash
# Installs what the tests run against: Debian's docker-registry (distribution
# 2.8), htpasswd and curl. (kube-apiserver and etcd are built from Go modules
# by tests/k8s/build.sh, which the tests run on first use.) Needs root (or sudo). Does nothing when both are present.
set -euo pipefail
if command -v docker-registry >/dev/null && command -v htpasswd >/dev/null && command -v curl >/dev/null; then
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends docker-registry apache2-utils curl ca-certificates >/dev/null
# The package starts its own service on :5000 where systemd runs; the tests
# start their own registries, so stop it to free the port for the demo.
if command -v systemctl >/dev/null && systemctl is-active --quiet docker-registry 2>/dev/null; then
    $sudo systemctl disable --now docker-registry || true
fi
