// Command testbin is every program the test cluster's images run, picked by
// the name it is started as (a file of that name in the image):
//
//   - pause: the pod sandbox's process; sleeps until SIGTERM or SIGINT.
//   - cp: just enough of `cp -a SRC DST` for Porch's init container, which
//     runs `cp -a /home/nonroot/wrapper-server/. /wrapper-server-tools`.
//   - wrapper-server: a stand-in for Porch's wrapper-server at the process
//     level: it listens on --port, runs the command after the first `--`
//     (the function's entrypoint, as the webhook left it) with its output on
//     the container's, and reports healthy once that process ran and
//     exited 0.
//   - grpc-health-probe: the probe Porch's pods exec, `-addr HOST:PORT`;
//     exits 0 when the wrapper-server there says it is healthy.
//   - function: a KRM function stand-in that prints the arguments it was
//     started with, so a test reads from the pod's log which entrypoint ran.
package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	// `testbin NAME ARGS...` runs NAME too, for trying it by hand.
	if name == "testbin" && len(args) > 0 {
		name, args = args[0], args[1:]
	}
	var err error
	switch name {
	case "pause":
		pause()
	case "cp":
		err = copyCommand(args)
	case "wrapper-server":
		err = wrapperServer(args)
	case "grpc-health-probe":
		err = probe(args)
	case "function":
		fmt.Printf("fn-image-resolver test function ran: %s\n", strings.Join(args, " "))
	default:
		err = fmt.Errorf("testbin: unknown program %q", name)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
}

func pause() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
}

// copyCommand copies SRC to DST keeping modes and symlinks; SRC ending in
// "/." copies the directory's contents into DST, as cp -a does.
func copyCommand(args []string) error {
	if len(args) != 3 || args[0] != "-a" {
		return fmt.Errorf("usage: cp -a SRC DST (got %q)", args)
	}
	src, dst := args[1], args[2]
	if strings.HasSuffix(src, "/.") {
		return copyTree(strings.TrimSuffix(src, "/."), dst)
	}
	return copyTree(src, filepath.Join(dst, filepath.Base(src)))
}

func copyTree(src, dst string) error {
	return filepath.Walk(src, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case info.Mode()&os.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			return os.Symlink(link, target)
		case info.IsDir():
			return os.MkdirAll(target, info.Mode().Perm())
		default:
			return copyFile(path, target, info.Mode().Perm())
		}
	})
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func wrapperServer(args []string) error {
	port := "9446"
	var entrypoint []string
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "--":
			entrypoint = args[i+1:]
			i = len(args)
		case "--port":
			if i+1 < len(args) {
				port = args[i+1]
			}
			i++
		case "--max-request-body-size", "--verbosity":
			i++
		}
	}
	if len(entrypoint) == 0 {
		return fmt.Errorf("no function entrypoint after --")
	}
	listener, err := net.Listen("tcp", ":"+port)
	if err != nil {
		return err
	}
	var ran atomic.Bool
	go func() {
		fmt.Printf("wrapper-server: listening on :%s, running %q\n", port, entrypoint)
		cmd := exec.Command(entrypoint[0], entrypoint[1:]...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "wrapper-server: function %q: %v\n", entrypoint, err)
			return
		}
		ran.Store(true)
	}()
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if !ran.Load() {
			http.Error(w, "NOT_SERVING", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "SERVING")
	})
	return http.Serve(listener, mux)
}

func probe(args []string) error {
	if len(args) != 2 || args[0] != "-addr" {
		return fmt.Errorf("usage: grpc-health-probe -addr HOST:PORT (got %q)", args)
	}
	client := http.Client{Timeout: time.Second}
	resp, err := client.Get("http://" + args[1] + "/healthz")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status: %s", resp.Status)
	}
	fmt.Println("status: SERVING")
	return nil
}
