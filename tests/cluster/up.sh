#!/usr/bin/env bash
# Starts a whole single-node Kubernetes cluster inside a network namespace of
# its own, for the tests and for trying things by hand:
#
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
#   kubelet + containerd + runc, a CNI bridge (pods on 10.244.0.0/24),
#   kube-proxy (iptables; Services on 10.96.0.0/16), CoreDNS behind the
#   Service kube-system/kube-dns (10.96.0.10), and a plain-HTTP registry
#   on the node that takes pushes without credentials and that the node
#   pulls from.
#
# Pod and Service addresses exist only inside the namespace; nothing in it
# has a route out. Binaries come from pinned Go modules (tests/cluster/build.sh,
# cached outside the repo) and Debian packages (containerd, runc,
# containernetworking-plugins, iptables, docker-registry).
#
# Prints shell `export` lines on stdout, and nothing else (everything it
# starts writes to its own log), so that
#
#   eval "$(tests/cluster/up.sh)"
#   $CLUSTER_EXEC kubectl get nodes
#
# works. A cluster already up is reused: the second call prints the same
# lines at once. tests/cluster/down.sh stops it and removes its state.
#
# Needs root (network namespaces, iptables, mounts). Settings:
#   FNIR_CLUSTER_DIR    state, logs, kubeconfig   (/tmp/fnir-cluster)
#   FNIR_CLUSTER_NETNS  the namespace's name      (fnir-cluster)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${FNIR_CLUSTER_DIR:-/tmp/fnir-cluster}
netns=${FNIR_CLUSTER_NETNS:-fnir-cluster}
node_ip=10.255.0.1
node_name=fnir-node
registry=$node_ip:5000
dns_ip=10.96.0.10
exec_prefix="nsenter --net=/run/netns/$netns --"
start=$SECONDS

log() { echo "cluster/up.sh: $*" >&2; }
fail() {
    log "error: $*"
    exit 1
}
in_ns() { $exec_prefix "$@"; }

[ "$(id -u)" -eq 0 ] || fail "needs root (network namespace, iptables, mounts); run it with sudo"

kubectl_ns() { in_ns kubectl --kubeconfig "$state/admin.kubeconfig" "$@"; }

apiserver_ready() {
    in_ns curl -sf --max-time 2 --cacert "$state/pki/ca.crt" \
        -H "Authorization: Bearer $(cat "$state/pki/admin.token")" \
        "https://$node_ip:6443/readyz" >/dev/null 2>&1
}

if [ -f "$state/env" ] && [ -e "/run/netns/$netns" ] && apiserver_ready && kubectl_ns get node "$node_name" >/dev/null 2>&1; then
    log "reusing the cluster in $state"
    cat "$state/env"
    exit 0
fi
if [ -e "$state" ] || [ -e "/run/netns/$netns" ]; then
    log "a cluster that is not healthy is left over; stopping it first"
    "$here/down.sh" >&2
fi

# --- What it runs --------------------------------------------------------
"$repo/scripts/install-test-deps.sh" >&2
bin=$("$here/build.sh" | tail -n 1)
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy coredns testbin crane; do
    [ -x "$bin/$b" ] || fail "$bin/$b missing after tests/cluster/build.sh"
done
log "binaries ready ($((SECONDS - start)) s)"

mkdir -p "$state"/{logs,pids,pki,cni/net.d,cni/ipam,certs.d,containerd,kubelet,pod-logs,registry,images}

# --- The network namespace ----------------------------------------------
# One end of a veth pair is the namespace's eth0 with the node's address;
# the other end stays in the caller's namespace, up but with no address, so
# nothing is routed between the two. kube-apiserver wants a default route,
# so there is one, to a gateway that does not exist.
ip netns add "$netns"
ip link add "fnir-veth0" type veth peer name eth0 netns "$netns"
ip link set "fnir-veth0" up
in_ns ip link set lo up
in_ns ip addr add "$node_ip/24" dev eth0
in_ns ip link set eth0 up
in_ns ip route add default via 10.255.0.254 dev eth0 onlink
in_ns sysctl -qw net.ipv4.ip_forward=1
# A resolv.conf for the node's own lookups (the kubelet hands it to pods
# with dnsPolicy Default): there is no upstream, so it names cluster DNS.
echo "nameserver $dns_ip" >"$state/resolv.conf"

run() { # name, command...: started in the namespace, detached, logging to logs/NAME.log
    local name=$1
    shift
    setsid $exec_prefix "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$state/pids/$name"
}

wait_for() { # what, seconds, command...
    local what=$1 limit=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            log "timed out after ${limit}s waiting for $what; logs in $state/logs"
            tail -n 20 "$state"/logs/*.log >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "$what ($((SECONDS - start)) s)"
}

# --- Certificates and credentials ----------------------------------------
pki=$state/pki
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/CN=fnir-cluster-ca" -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=kube-apiserver" -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
printf 'subjectAltName=IP:%s,IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' \
    "$node_ip" >"$pki/apiserver.ext"
openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$pki/sa.key" 2>/dev/null
openssl ec -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
# Every component authenticates with a token of its own, all in
# system:masters: the cluster is a test bed, its RBAC is what the tests
# check for the project's own ServiceAccount.
: >"$pki/tokens.csv"
for who in admin kube-controller-manager kube-scheduler kubelet kube-proxy coredns; do
    token=$(openssl rand -hex 24)
    echo "$token" >"$pki/$who.token"
    echo "$token,$who,$who,system:masters" >>"$pki/tokens.csv"
    kubeconfig=$state/$who.kubeconfig
    [ "$who" = admin ] && kubeconfig=$state/admin.kubeconfig
    cat >"$kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: fnir
    cluster:
      server: https://$node_ip:6443
      certificate-authority: $pki/ca.crt
users:
  - name: $who
    user:
      token: $token
contexts:
  - name: fnir
    context: {cluster: fnir, user: $who}
current-context: fnir
EOF
done

# --- Control plane --------------------------------------------------------
run etcd "$bin/etcd" --data-dir="$state/etcd" \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
    --initial-cluster=default=http://127.0.0.1:2380 --name=default \
    --unsafe-no-fsync --log-level=warn
run kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --advertise-address="$node_ip" --bind-address=0.0.0.0 --secure-port=6443 \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --token-auth-file="$pki/tokens.csv" \
    --authorization-mode=RBAC \
    --service-cluster-ip-range=10.96.0.0/16 \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --kubelet-preferred-address-types=InternalIP \
    --allow-privileged=true \
    --profiling=false
wait_for "kube-apiserver ready" 120 apiserver_ready

run kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$state/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$state/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$state/kube-controller-manager.kubeconfig" \
    --controllers='*,-nodeipam' --leader-elect=false \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --use-service-account-credentials=false \
    --bind-address=127.0.0.1 --profiling=false
run kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig="$state/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$state/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$state/kube-scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --profiling=false

# --- The registry on the node ----------------------------------------------
cat >"$state/registry.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $state/registry}, delete: {enabled: true}}
http: {addr: $registry}
EOF
run registry docker-registry serve "$state/registry.yml"
wait_for "registry on $registry" 30 in_ns curl -sf "http://$registry/v2/"

# The pod sandbox image: nothing can be pulled from outside, so the node's
# pause image is ours (testbin as /pause, which sleeps until SIGTERM).
pause_image=$registry/fnir/pause:test
mkdir -p "$state/images/pause"
cp "$bin/testbin" "$state/images/pause/pause"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "$state/images/pause" -cf "$state/images/pause.tar" pause
in_ns "$bin/crane" append --insecure --oci-empty-base -f "$state/images/pause.tar" \
    -t "$pause_image" >/dev/null 2>"$state/logs/crane.log"
in_ns "$bin/crane" mutate --insecure --set-platform linux/amd64 --entrypoint /pause \
    -t "$pause_image" "$pause_image" >/dev/null 2>>"$state/logs/crane.log"
log "pause image pushed to $pause_image ($((SECONDS - start)) s)"

# --- The node: containerd, CNI, kubelet --------------------------------------
# Registry hosts in containerd's own format; tests add theirs (the private
# TLS registry) beside this one.
mkdir -p "$state/certs.d/$registry"
cat >"$state/certs.d/$registry/hosts.toml" <<EOF
server = "http://$registry"

[host."http://$registry"]
  capabilities = ["pull", "resolve", "push"]
EOF
cat >"$state/cni/net.d/10-fnir.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "fnir",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.0.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$state/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
sock=$state/containerd/containerd.sock
cat >"$state/containerd/config.toml" <<EOF
version = 2
root = "$state/containerd/root"
state = "$state/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "$state/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  # The sandbox here may not lower oom_score_adj (no CAP_SYS_RESOURCE):
  # without this, runc fails the pause container ("can't get final child's
  # PID from pipe: EOF").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # The kubelet's cgroupDriver is cgroupfs (no systemd here), the
        # same on cgroup v1 and v2.
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$state/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$state/certs.d"
EOF
run containerd containerd --config "$state/containerd/config.toml"
wait_for "containerd" 30 in_ns ctr --address "$sock" version

cat >"$state/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$sock
cgroupDriver: cgroupfs
# No systemd and no delegated cgroup tree to build QoS levels in.
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
failCgroupV1: false
address: $node_ip
readOnlyPort: 0
# The API server calls the kubelet (logs, exec) without a client
# certificate; the namespace is private to this cluster.
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
clusterDNS: [$dns_ip]
clusterDomain: cluster.local
resolvConf: $state/resolv.conf
podLogsDir: $state/pod-logs
serializeImagePulls: false
# Secret volumes (an optional Secret created later, a rotated one) reach
# the pods within seconds rather than a minute: the tests wait for it.
syncFrequency: 10s
# A test machine's disk is not a node's: never evict for it.
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
run kubelet "$bin/kubelet" --config="$state/kubelet/config.yaml" \
    --kubeconfig="$state/kubelet.kubeconfig" --root-dir="$state/kubelet" \
    --cert-dir="$state/kubelet/pki" \
    --node-ip="$node_ip" --hostname-override="$node_name" --v=1
run kube-proxy "$bin/kube-proxy" --kubeconfig="$state/kube-proxy.kubeconfig" \
    --proxy-mode=iptables --cluster-cidr=10.244.0.0/16 --hostname-override="$node_name" \
    --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 \
    --conntrack-tcp-timeout-close-wait=0 \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256

# --- Cluster DNS ----------------------------------------------------------
# CoreDNS runs on the node itself (no image to pull); the Service kube-dns
# has no selector and one EndpointSlice that names the node.
cat >"$state/Corefile" <<EOF
.:53 {
    bind $node_ip
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $state/coredns.kubeconfig fnir
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
    loop
}
EOF
run coredns "$bin/coredns" -conf "$state/Corefile"
kubectl_ns apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  clusterIP: $dns_ip
  ports:
    - {name: dns, port: 53, protocol: UDP, targetPort: 53}
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: fnir-cluster
addressType: IPv4
endpoints:
  - addresses: [$node_ip]
    conditions: {ready: true}
ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF

node_ready() {
    [ "$(kubectl_ns get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
wait_for "node $node_name Ready" 180 node_ready
wait_for "ServiceAccount default/default" 60 kubectl_ns -n default get serviceaccount default
# A name looked up through the Service's address: kube-proxy's rules and
# CoreDNS both work.
dns_answers() {
    in_ns python3 "$here/dns_query.py" "$dns_ip" kubernetes.default.svc.cluster.local | grep -qx 10.96.0.1
}
wait_for "cluster DNS through Service kube-dns" 60 dns_answers

cat >"$state/env" <<EOF
export KUBECONFIG=$state/admin.kubeconfig
export CLUSTER_EXEC="$exec_prefix"
export CLUSTER_REGISTRY=$registry
export CLUSTER_NODE_IP=$node_ip
export CLUSTER_NODE_NAME=$node_name
export CLUSTER_CERTS_D=$state/certs.d
export CLUSTER_CONTAINERD_ADDRESS=$sock
export CLUSTER_STATE_DIR=$state
EOF
log "cluster up in $((SECONDS - start)) s; logs in $state/logs"
cat "$state/env"
