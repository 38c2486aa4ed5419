#!/usr/bin/env bash
# The webhook, locally: starts the sample registry, generates a CA and a
# serving certificate, runs `fn-image-resolver serve` with HTTPS on
# 127.0.0.1:8443, sends it the AdmissionReview of a Porch function pod
# (tests/fixtures/function-pod-review.json) and prints the patch and the
# patched pod (applied with `kubectl patch --local`, no cluster needed).
set -euo pipefail
cd "$(dirname "$0")/.."
reg_port=${REGISTRY_PORT:-5000}
port=${PORT:-8443}
host=127.0.0.1:$reg_port
cargo build --quiet --example sample_registry --bin fn-image-resolver
work=$(mktemp -d)
target/debug/examples/sample_registry "$reg_port" >"$work/registry.log" 2>&1 &
reg_pid=$!
srv_pid=
trap 'kill $reg_pid $srv_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q '^ready' "$work/registry.log" && break; sleep 0.1; done
target/debug/fn-image-resolver certs --service fn-image-resolver --namespace porch-system \
    --san 127.0.0.1 --san localhost --out "$work/certs" >/dev/null
target/debug/fn-image-resolver serve --listen "127.0.0.1:$port" \
    --tls-cert-file "$work/certs/tls.crt" --tls-key-file "$work/certs/tls.key" \
    --resolver-listen 127.0.0.1:0 --insecure-registry "$host" --log-level warn &
srv_pid=$!
for _ in $(seq 100); do curl -sf --cacert "$work/certs/ca.crt" "https://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
sed "s/{{REGISTRY}}/$host/g; s/{{WRAPPER_REGISTRY}}/$host/g" tests/fixtures/function-pod-review.json >"$work/review.json"
echo "\$ curl --cacert ca.crt https://127.0.0.1:$port/mutate?timeout=10s -d @function-pod-review.json"
curl -sf --cacert "$work/certs/ca.crt" -H 'content-type: application/json' \
    "https://127.0.0.1:$port/mutate?timeout=10s" -d @"$work/review.json" >"$work/answer.json"
python3 - "$work" <<'PY'
import base64, json, sys
work = sys.argv[1]
answer = json.load(open(f"{work}/answer.json"))
resp = answer["response"]
print(json.dumps({k: v for k, v in resp.items() if k != "patch"}, indent=2))
patch = base64.b64decode(resp.get("patch", "")) if resp.get("patch") else b"[]"
open(f"{work}/patch.json", "wb").write(patch)
json.dump(json.load(open(f"{work}/review.json"))["request"]["object"], open(f"{work}/pod.json", "w"))
print("\nJSON Patch:")
print(json.dumps(json.loads(patch), indent=2))
PY
echo
echo "Patched pod:"
if command -v kubectl >/dev/null; then
    kubectl patch --local -f "$work/pod.json" --type=json --patch-file "$work/patch.json" -o yaml
else
    # Without kubectl: the pod's images, before and after.
    python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
pod = json.load(open(f"{work}/pod.json"))
for op in json.load(open(f"{work}/patch.json")):
    print(f"  {op['op']} {op['path']}: {op.get('value')}")
PY
fi
