package testenv

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// Istiod against a minimal MCP-over-xDS server that answers every type with no resources:
// istiod must start (the no-Kubernetes patch holds), sync, and serve its debug API.
func TestIstiodWithEmptyMCPServer(t *testing.T) {
	t.Parallel()
	mcp := startEmptyADS(t)
	istiod := StartIstiod(t, mcp.addr)

	eventually(t, 30*time.Second, func() error {
		status, body := do(t, http.MethodGet, "http://"+istiod.DebugAddr+"/debug/syncz", "")
		if status != http.StatusOK {
			return fmt.Errorf("syncz: status %d: %.200s", status, body)
		}
		return nil
	})
	const seType = "networking.istio.io/v1/ServiceEntry"
	eventually(t, 30*time.Second, func() error {
		if types := mcp.requested(); !slicesContain(types, seType) {
			return fmt.Errorf("istiod asked for %v, not yet %s", types, seType)
		}
		return nil
	})
	t.Logf("istiod asked for %d types: %v", len(mcp.requested()), mcp.requested())
	if istiod.Exited() {
		t.Fatalf("istiod exited: %v", istiod.Wait())
	}
}

func slicesContain(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// emptyADS is an xDS (SotW ADS) server written with the standard library alone: gRPC over
// cleartext HTTP/2, answering each type's first request with an empty response.
type emptyADS struct {
	addr string
	mu   sync.Mutex
	seen []string
}

func (a *emptyADS) requested() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.seen...)
}

func startEmptyADS(t *testing.T) *emptyADS {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &emptyADS{addr: l.Addr().String()}
	var protocols http.Protocols
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: http.HandlerFunc(a.serve), Protocols: &protocols}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return a
}

const adsMethod = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

func (a *emptyADS) serve(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
	w.Header().Set("Content-Type", "application/grpc")
	if r.URL.Path != adsMethod {
		w.WriteHeader(http.StatusOK)
		w.Header().Set("Grpc-Status", "12") // UNIMPLEMENTED
		w.Header().Set("Grpc-Message", "only ADS here")
		return
	}
	w.WriteHeader(http.StatusOK)
	flusher := w.(http.Flusher)
	flusher.Flush()
	nonce := 0
	answered := map[string]bool{}
	for {
		msg, err := readGRPCMessage(r.Body)
		if err != nil {
			w.Header().Set("Grpc-Status", "0")
			return
		}
		// Answer each type once; later requests are ACKs or NACKs. (istiod's first request
		// of each type already carries a response_nonce, a timestamp, so that can't tell.)
		typeURL := protoString(msg, 4)
		if answered[typeURL] {
			continue
		}
		answered[typeURL] = true
		a.mu.Lock()
		a.seen = append(a.seen, strings.TrimPrefix(typeURL, "type.googleapis.com/"))
		a.mu.Unlock()
		nonce++
		// DiscoveryResponse{version_info: "1", type_url: typeURL, nonce: n}, no resources.
		var resp []byte
		resp = protoAppendString(resp, 1, "1")
		resp = protoAppendString(resp, 4, typeURL)
		resp = protoAppendString(resp, 5, fmt.Sprint(nonce))
		if err := writeGRPCMessage(w, resp); err != nil {
			return
		}
		flusher.Flush()
	}
}

func readGRPCMessage(r io.Reader) ([]byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	if hdr[0] != 0 {
		return nil, errors.New("compressed gRPC messages are not supported")
	}
	msg := make([]byte, binary.BigEndian.Uint32(hdr[1:]))
	_, err := io.ReadFull(r, msg)
	return msg, err
}

func writeGRPCMessage(w io.Writer, msg []byte) error {
	var hdr [5]byte
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(msg)))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err := w.Write(msg)
	return err
}

// protoString returns the last value of string field num in a protobuf message ("" if absent
// or malformed).
func protoString(msg []byte, num int) string {
	var val string
	for len(msg) > 0 {
		key, n := binary.Uvarint(msg)
		if n <= 0 {
			return ""
		}
		msg = msg[n:]
		switch key & 7 {
		case 0: // varint
			_, n = binary.Uvarint(msg)
			if n <= 0 {
				return ""
			}
			msg = msg[n:]
		case 1: // fixed64
			if len(msg) < 8 {
				return ""
			}
			msg = msg[8:]
		case 2: // length-delimited
			l, n := binary.Uvarint(msg)
			if n <= 0 || uint64(len(msg)-n) < l {
				return ""
			}
			if int(key>>3) == num {
				val = string(msg[n : n+int(l)])
			}
			msg = msg[n+int(l):]
		case 5: // fixed32
			if len(msg) < 4 {
				return ""
			}
			msg = msg[4:]
		default:
			return ""
		}
	}
	return val
}

func protoAppendString(b []byte, num int, s string) []byte {
	b = binary.AppendUvarint(b, uint64(num)<<3|2)
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}
