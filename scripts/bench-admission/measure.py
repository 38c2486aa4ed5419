"""Creates Porch-shaped function pods through the API server and reports
the API server's own latency metrics for them (scripts/bench-admission.sh).

Three phases, each a burst of pod creations, serial, each pod deleted once
stored: 'no-webhook' (a namespace the webhook does not match), 'hit' (one
image the webhook has resolved before) and 'miss' (a tag never asked for,
so a registry round trip inside admission). For each phase it scrapes
/metrics before and after and reports, from the differences of the
histograms:

  apiserver_admission_webhook_admission_duration_seconds (our webhook's
      call, as the API server times it; absent without the webhook), and
  apiserver_request_duration_seconds for POST pods (the whole create).

Quantiles are interpolated within the histogram's buckets, as Prometheus'
histogram_quantile does; the mean (sum / count) is exact.

Usage: measure.py API_URL CA_FILE TOKEN_FILE FIXTURE REGISTRY N
"""

import json
import re
import ssl
import sys
import urllib.request

API, CA, TOKEN_FILE, FIXTURE, REGISTRY, N = sys.argv[1:7]
N = int(N)
TOKEN = open(TOKEN_FILE).read().strip()
CONTEXT = ssl.create_default_context(cafile=CA)


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(API + path, data=data, method=method)
    req.add_header("Authorization", "Bearer " + TOKEN)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, context=CONTEXT, timeout=30) as resp:
        return resp.read()


SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} ([0-9.e+-]+|\+Inf|NaN)$')


def scrape():
    """{(name, frozenset(labels)): value} of the two histograms."""
    out = {}
    for line in call("GET", "/metrics").decode().splitlines():
        if not (line.startswith("apiserver_admission_webhook_admission_duration_seconds")
                or line.startswith("apiserver_request_duration_seconds")):
            continue
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in re.findall(r'\w+="[^"]*"', m.group(2)))
        labels = {k: v.strip('"') for k, v in labels.items()}
        out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def histogram(before, after, name, match):
    """Buckets [(le, count)], sum, count of the difference, for series of
    `name` whose labels include `match`."""
    buckets, total, count = {}, 0.0, 0.0
    for (metric, labels), value in after.items():
        labels = dict(labels)
        if not all(labels.get(k) == v for k, v in match.items()):
            continue
        delta = value - before.get((metric, frozenset(labels.items())), 0.0)
        if metric == name + "_bucket":
            le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) + delta
        elif metric == name + "_sum":
            total += delta
        elif metric == name + "_count":
            count += delta
    return sorted(buckets.items()), total, count


def quantile(q, buckets, count):
    if count == 0:
        return None
    rank = q * count
    lower_le, lower_count = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if le == float("inf"):
                return lower_le
            width = cumulative - lower_count
            frac = (rank - lower_count) / width if width else 0
            return lower_le + (le - lower_le) * frac
        lower_le, lower_count = le, cumulative
    return None


def pod(namespace, image):
    review = json.loads(open(FIXTURE).read()
                        .replace("{{REGISTRY}}", REGISTRY)
                        .replace("{{WRAPPER_REGISTRY}}", REGISTRY))
    obj = review["request"]["object"]
    obj["metadata"]["namespace"] = namespace
    spec = obj["spec"]
    spec["volumes"] = [v for v in spec["volumes"] if not v["name"].startswith("kube-api-access-")]
    for c in spec["containers"] + spec["initContainers"]:
        c["volumeMounts"] = [m for m in c["volumeMounts"] if not m["name"].startswith("kube-api-access-")]
    for key in ("serviceAccountName", "serviceAccount", "tolerations", "priority",
                "enableServiceLinks", "preemptionPolicy"):
        spec.pop(key, None)
    spec["containers"][0]["image"] = image
    return obj


def create_and_delete(namespace, image):
    stored = json.loads(call("POST", f"/api/v1/namespaces/{namespace}/pods", pod(namespace, image)))
    name = stored["metadata"]["name"]
    call("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}?gracePeriodSeconds=0")
    return stored["spec"]["containers"][0]["image"]


def phase(title, namespace, images):
    before = scrape()
    pinned = sum("@sha256:" in create_and_delete(namespace, image) for image in images)
    after = scrape()
    rows = []
    for label, name, match in [
        ("webhook call", "apiserver_admission_webhook_admission_duration_seconds",
         {"name": "fn-image-resolver.porch.kpt.dev", "operation": "CREATE", "type": "admit"}),
        ("POST pods", "apiserver_request_duration_seconds",
         {"verb": "POST", "resource": "pods", "subresource": ""}),
    ]:
        buckets, total, count = histogram(before, after, name, match)
        if count == 0:
            rows.append(f"| {title} | {label} | 0 | – | – | – |")
            continue
        p50, p99 = quantile(0.5, buckets, count), quantile(0.99, buckets, count)
        rows.append(f"| {title} | {label} | {int(count)} | {total / count * 1000:.1f} | "
                    f"{p50 * 1000:.1f} | {p99 * 1000:.1f} |")
    print("\n".join(rows), flush=True)
    print(f"  ({title}: {pinned} of {len(images)} stored pinned)", file=sys.stderr, flush=True)


image = f"{REGISTRY}/fns/bench:hit"
print("| phase | what the API server timed | count | mean ms | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|")
create_and_delete("porch-fn-system", image)  # the one miss that warms "hit"
phase("no webhook", "bench-plain", [image] * N)
phase("cache hit", "porch-fn-system", [image] * N)
phase("cold miss", "porch-fn-system", [f"{REGISTRY}/fns/bench:miss-{i}" for i in range(N)])
