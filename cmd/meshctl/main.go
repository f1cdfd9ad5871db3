// Command meshctl is meshturbo's admin CLI. It reads (and, for upgrades, drives) the admin
// API of every meshturbo daemon: meshturbo-xds (registries, bridged services, lazy loading),
// meshturbo-upgrade (the sidecar's Envoy and its hot upgrades) and meshturbo-agent (socket
// acceleration, VPP). Run `meshctl --help` for the commands and the exit codes.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := execute(ctx, os.Args[1:], &environment{
		stdout: os.Stdout,
		stderr: os.Stderr,
		getenv: os.Getenv,
		now:    time.Now,
		isTTY:  isTerminal(os.Stderr),
	})
	stop()
	os.Exit(code)
}
