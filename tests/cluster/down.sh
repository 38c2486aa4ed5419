#!/usr/bin/env bash
# Stops the cluster tests/cluster/up.sh started and removes its state: the
# pods' containers (their shims outlive containerd), every daemon, the mounts
# the kubelet and containerd made, the pods' network namespaces and the
# cluster's own, then the state directory. Safe to run when nothing is up.
set -uo pipefail
state=${FNIR_CLUSTER_DIR:-/tmp/fnir-cluster}
netns=${FNIR_CLUSTER_NETNS:-fnir-cluster}
log() { echo "cluster/down.sh: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "needs root"; exit 1; }

stop() { # name: SIGTERM, then SIGKILL after 5 s
    local pidfile=$state/pids/$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

# The kubelet first, so that it restarts nothing; then every container,
# pause containers included, through containerd while it still runs.
stop kubelet
sock=$state/containerd/containerd.sock
if [ -S "$sock" ]; then
    for task in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
        ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$task" >/dev/null 2>&1
    done
fi
for name in kube-proxy coredns kube-scheduler kube-controller-manager kube-apiserver etcd containerd registry; do
    stop "$name"
done
# Shims (and, through them, anything left of the containers) of this
# containerd only: they name its socket on their command line.
pkill -9 -f "containerd-shim-runc-v2 .*-address $sock" 2>/dev/null
sleep 0.5

# Mounts under the state directory (pod volumes, overlay snapshots, shm),
# deepest first.
if [ -d "$state" ]; then
    awk -v s="$state/" 'index($2, s) == 1 {print $2}' /proc/self/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || log "could not unmount $m"; done
fi
# Pod network namespaces containerd made and could not remove (it was
# stopped with them): those holding an address of the cluster's pod range.
for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}'); do
    if ip netns exec "$ns" ip -o -4 addr show 2>/dev/null | grep -q ' 10\.244\.'; then
        ip netns delete "$ns"
    fi
done
# The cluster's namespace takes its links, bridge and iptables rules along.
ip link delete fnir-veth0 2>/dev/null
[ -e "/run/netns/$netns" ] && ip netns delete "$netns"
rm -rf "$state"
log "stopped; $state removed"
