//go:build tools

// Package tools pins the commands the tests build from k8s.io/kubernetes so
// `go mod tidy` keeps their dependencies: the API server for the API-only
// tests, and the rest of a single-node cluster for tests/cluster/up.sh.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
