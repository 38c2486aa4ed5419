#!/usr/bin/env bash
# The latency the API server sees (issue 25, point 8): on the test cluster
# (tests/cluster/up.sh), the project's image installed from deploy/ as an
# operator does, then Porch-shaped function pods created through the API
# server with no webhook (a namespace it does not match), with a cache hit,
# and with a cold miss (a tag never resolved before), reporting the API
# server's own apiserver_admission_webhook_admission_duration_seconds and
# apiserver_request_duration_seconds (scripts/bench-admission/measure.py).
#
#   sudo scripts/bench-admission.sh          # N=200 pods per phase
#
# Leaves the cluster up and the webhook installed (tests/cluster/down.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
n=${N:-200}
cluster_env=$(tests/cluster/up.sh)
eval "$cluster_env"
scripts/build-image.sh --fetch >&2
image=$($CLUSTER_EXEC scripts/build-image.sh --insecure "$CLUSTER_REGISTRY/fn-image-resolver:bench")
crane=$(tests/crane/build.sh | tail -n 1)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The function image: the cluster's pause image under the names the pods
# use; a tag per cold miss.
$CLUSTER_EXEC "$crane" copy --insecure "$CLUSTER_REGISTRY/fnir/pause:test" "$CLUSTER_REGISTRY/fns/bench:hit" 2>/dev/null
$CLUSTER_EXEC "$crane" copy --insecure "$CLUSTER_REGISTRY/fnir/pause:test" "$CLUSTER_REGISTRY/nephio/porch-wrapper-server:v4" 2>/dev/null
for i in $(seq 0 $((n - 1))); do
    $CLUSTER_EXEC "$crane" tag --insecure "$CLUSTER_REGISTRY/fns/bench:hit" "miss-$i" 2>/dev/null
done

# The operator's install: deploy/ with the image and plain HTTP to the
# cluster's registry.
name=${image%@*}
name=${name%:*}
up=$(realpath --relative-to="$work" "$repo/deploy")
cat >"$work/kustomization.yaml" <<YAML
resources: [$up]
images:
  - name: ghcr.io/kptdev/fn-image-resolver
    newName: $name
    digest: ${image#*@}
patches:
  - target: {kind: Deployment, name: fn-image-resolver}
    patch: |
      - op: add
        path: /spec/template/spec/containers/0/args/-
        value: --insecure-registry=$CLUSTER_REGISTRY
YAML
k() { $CLUSTER_EXEC kubectl "$@"; }
for ns in porch-system porch-fn-system bench-plain; do
    k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
done
for ns in porch-system porch-fn-system bench-plain; do
    until k -n "$ns" get serviceaccount default >/dev/null 2>&1; do sleep 0.5; done
done
k apply -k "$work" >/dev/null
k -n porch-system rollout status deployment/fn-image-resolver --timeout=240s >&2

echo "# $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r); N=$n pods a phase, serial"
$CLUSTER_EXEC python3 "$repo/scripts/bench-admission/measure.py" \
    "https://$CLUSTER_NODE_IP:6443" "$CLUSTER_STATE_DIR/pki/ca.crt" \
    "$CLUSTER_STATE_DIR/pki/admin.token" "$repo/tests/fixtures/function-pod-review.json" \
    "$CLUSTER_REGISTRY" "$n"
