// Command coredns is CoreDNS with only the plugins the test cluster's DNS
// uses (the way CoreDNS documents building a smaller server): names of
// Services and Pods from the API server, nothing forwarded anywhere (the
// cluster has no route out).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	"github.com/coredns/coredns/coremain"
)

func init() {
	// The order in which the plugins see a query: CoreDNS's own plugin.cfg
	// order, restricted to the plugins above.
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "cache", "kubernetes", "loop"}
}

func main() {
	coremain.Run()
}
