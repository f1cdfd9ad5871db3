// Package vcl renders what a sidecar needs to use VPP's host stack: the VPP Comms Library
// configuration (vcl.conf) for its app namespace, and the Envoy bootstrap fragment that makes
// VCL Envoy's default socket interface. It also checks that an Envoy binary has the VCL socket
// interface at all: it is an Envoy contrib extension, missing from the standard build.
package vcl

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Params is one sidecar's VCL configuration.
type Params struct {
	// AppSocketAPI is the path of the app namespace's session-layer socket (VPP creates it
	// when the namespace is added; with `session { use-app-socket-api }` in startup.conf).
	AppSocketAPI string
	// NamespaceID and NamespaceSecret name the app namespace and authenticate the attach.
	// Over the app socket API the socket itself selects the namespace; VCL sends id and
	// secret when it attaches over the binary API instead.
	NamespaceID     string
	NamespaceSecret uint64
	// SegmentSize is the first shared-memory segment VPP allocates for the app;
	// AddSegmentSize each further one.
	SegmentSize    uint64
	AddSegmentSize uint64
	// RxFifoSize and TxFifoSize are each session's receive and transmit fifos, in bytes.
	RxFifoSize uint32
	TxFifoSize uint32
	// EventQueueSize is the length of each VCL worker's event queue.
	EventQueueSize uint32
}

// Defaults are VCL's own defaults except for the event queue, which Envoy's many
// connections per worker outgrow.
var Defaults = Params{
	SegmentSize:    256 << 20,
	AddSegmentSize: 128 << 20,
	RxFifoSize:     1 << 20,
	TxFifoSize:     1 << 20,
	EventQueueSize: 16384,
}

func (p Params) validate() error {
	var errs []error
	if p.AppSocketAPI == "" || strings.ContainsAny(p.AppSocketAPI, " \t\n") {
		errs = append(errs, fmt.Errorf("AppSocketAPI %q must be a path without spaces", p.AppSocketAPI))
	}
	if p.NamespaceID == "" || len(p.NamespaceID) > 64 || strings.ContainsAny(p.NamespaceID, " \t\n") {
		errs = append(errs, fmt.Errorf("NamespaceID %q must be 1-64 characters without spaces", p.NamespaceID))
	}
	if p.NamespaceSecret == 0 {
		errs = append(errs, errors.New("NamespaceSecret is zero"))
	}
	if p.SegmentSize == 0 || p.AddSegmentSize == 0 || p.RxFifoSize == 0 || p.TxFifoSize == 0 || p.EventQueueSize == 0 {
		errs = append(errs, errors.New("segment, fifo and event queue sizes must be set (start from Defaults)"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("vcl: %w", err)
	}
	return nil
}

// Conf renders vcl.conf. Envoy's VCL socket interface polls VCL's message queues through
// eventfds registered with its event loop, so the configuration always sets use-mq-eventfd;
// app-scope-local and app-scope-global let a sidecar reach both sidecars on the node (cut
// through shared memory) and the network.
func Conf(p Params) ([]byte, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# VCL configuration for app namespace %s, written by meshturbo-agent.\n", p.NamespaceID)
	b.WriteString("vcl {\n")
	fmt.Fprintf(&b, "  app-socket-api %s\n", p.AppSocketAPI)
	fmt.Fprintf(&b, "  namespace-id %s\n", p.NamespaceID)
	fmt.Fprintf(&b, "  namespace-secret %d\n", p.NamespaceSecret)
	fmt.Fprintf(&b, "  segment-size %d\n", p.SegmentSize)
	fmt.Fprintf(&b, "  add-segment-size %d\n", p.AddSegmentSize)
	fmt.Fprintf(&b, "  rx-fifo-size %d\n", p.RxFifoSize)
	fmt.Fprintf(&b, "  tx-fifo-size %d\n", p.TxFifoSize)
	fmt.Fprintf(&b, "  event-queue-size %d\n", p.EventQueueSize)
	b.WriteString("  use-mq-eventfd\n")
	b.WriteString("  app-scope-local\n")
	b.WriteString("  app-scope-global\n")
	b.WriteString("}\n")
	return b.Bytes(), nil
}

// The names Envoy's VCL contrib extension registers under.
const (
	SocketInterfaceName = "envoy.extensions.vcl.vcl_socket_interface"
	SocketInterfaceType = "type.googleapis.com/envoy.extensions.vcl.v3alpha.VclSocketInterface"
)

// ConfigEnv is the environment variable VCL reads its configuration path from; the sidecar's
// Envoy must run with it pointing at the vcl.conf written for it.
const ConfigEnv = "VCL_CONFIG"

// Fragment is the Envoy bootstrap fragment (JSON) that loads the VCL socket interface and makes
// it the default for every socket Envoy opens. Note "every": the xDS and SDS connections too.
func Fragment() []byte {
	return []byte(`{
  "bootstrap_extensions": [
    {
      "name": "` + SocketInterfaceName + `",
      "typed_config": {
        "@type": "` + SocketInterfaceType + `"
      }
    }
  ],
  "default_socket_interface": "` + SocketInterfaceName + `"
}
`)
}

// Merge returns the JSON bootstrap with the fragment merged in: the VCL extension appended to
// bootstrap_extensions (once) and default_socket_interface set to it. A bootstrap that already
// names another default socket interface is an error rather than silently overridden.
func Merge(bootstrap []byte) ([]byte, error) {
	var bs map[string]any
	dec := json.NewDecoder(bytes.NewReader(bootstrap))
	dec.UseNumber() // keep 64-bit integers exact
	if err := dec.Decode(&bs); err != nil {
		return nil, fmt.Errorf("vcl: merge into bootstrap: %w", err)
	}
	if bs == nil {
		bs = map[string]any{}
	}
	if cur, ok := bs["default_socket_interface"].(string); ok && cur != "" && cur != SocketInterfaceName {
		return nil, fmt.Errorf("vcl: merge into bootstrap: it already sets default_socket_interface %q", cur)
	}
	var exts []any
	if v, ok := bs["bootstrap_extensions"]; ok {
		if exts, ok = v.([]any); !ok {
			return nil, errors.New("vcl: merge into bootstrap: bootstrap_extensions is not a list")
		}
	}
	present := false
	for _, e := range exts {
		if m, ok := e.(map[string]any); ok && m["name"] == SocketInterfaceName {
			present = true
		}
	}
	if !present {
		exts = append(exts, map[string]any{
			"name":         SocketInterfaceName,
			"typed_config": map[string]any{"@type": SocketInterfaceType},
		})
	}
	bs["bootstrap_extensions"] = exts
	bs["default_socket_interface"] = SocketInterfaceName
	out, err := json.MarshalIndent(bs, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("vcl: merge into bootstrap: %w", err)
	}
	return append(out, '\n'), nil
}
