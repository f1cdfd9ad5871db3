package vpp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	"go.fd.io/govpp/adapter"
	"go.fd.io/govpp/adapter/socketclient"
	"go.fd.io/govpp/api"
	afpacket "go.fd.io/govpp/binapi/af_packet"
	"go.fd.io/govpp/binapi/dev"
	interfaces "go.fd.io/govpp/binapi/interface"
	"go.fd.io/govpp/binapi/ip"
	"go.fd.io/govpp/binapi/memclnt"
	"go.fd.io/govpp/binapi/rdma"
	"go.fd.io/govpp/binapi/session"
	"go.fd.io/govpp/binapi/vpe"
	"go.fd.io/govpp/core"
)

// ErrNotConnected is returned by Reconcile while the agent has no connection to VPP; the
// desired state is kept and applied as soon as it connects.
var ErrNotConnected = errors.New("not connected to VPP")

// ErrNoReply is wrapped in the APIError of a request VPP did not answer in time.
var ErrNoReply = errors.New("no reply")

// APIError is a request that failed: VPP answered with a non-zero return value (Retval), did
// not answer (wraps ErrNoReply), or could not be sent.
type APIError struct {
	Message string // the request, e.g. "dev_create_port_if"
	Retval  int32  // VPP's return value; 0 when there was no reply
	Err     error
}

func (e *APIError) Error() string { return fmt.Sprintf("vpp: %s: %v", e.Message, e.Err) }
func (e *APIError) Unwrap() error { return e.Err }

// IncompatibleError means the VPP behind the socket is not one this agent can drive: messages
// it needs are unknown to VPP or have another CRC (their definition changed), or the version
// is outside the supported range. The agent sends nothing else and stops: reconnecting would
// not help.
type IncompatibleError struct {
	// Messages are the agent's name_crc of the messages VPP lacks or defines differently.
	Messages []string
	// Version is VPP's show_version, when the version was the problem.
	Version string
	err     error
}

func (e *IncompatibleError) Error() string {
	if len(e.Messages) > 0 {
		return fmt.Sprintf("vpp: VPP's binary API is incompatible with this agent (built with govpp binapi for VPP 25.02): "+
			"%d messages unknown to VPP or with a different CRC: %s (a plugin not loaded, or another VPP release)",
			len(e.Messages), strings.Join(e.Messages, ", "))
	}
	return fmt.Sprintf("vpp: %v", e.err)
}

func (e *IncompatibleError) Unwrap() error { return e.err }

// vppConn is one connection to VPP and what the agent applied through it. A new connection is
// a new VPP as far as the agent knows: everything is re-applied from a dump.
type vppConn struct {
	conn    *core.Connection
	timeout time.Duration // per request
	version string

	ifc  interfaces.RPCService
	ipc  ip.RPCService
	sess session.RPCService
	vpe  vpe.RPCService
	mem  memclnt.RPCService
	dev  dev.RPCService
	rdma rdma.RPCService
	afp  afpacket.RPCService

	dead     chan struct{} // closed once a request went unanswered
	deadOnce sync.Once

	// Applied through this connection (guarded by Agent.applyMu). VPP has no dump for app
	// namespaces or the session layer's state, so the agent remembers what it set.
	sessionEnabled bool
	namespaces     map[string]appliedNamespace
}

type appliedNamespace struct {
	swIfIndex uint32
	secret    uint64
	sockName  string
}

// coreMessages are the messages every agent uses, requests and replies, for the CRC check.
func coreMessages() []api.Message {
	return []api.Message{
		&memclnt.ControlPing{}, &memclnt.ControlPingReply{},
		&vpe.ShowVersion{}, &vpe.ShowVersionReply{},
		&interfaces.SwInterfaceDump{}, &interfaces.SwInterfaceDetails{},
		&interfaces.SwInterfaceTagAddDel{}, &interfaces.SwInterfaceTagAddDelReply{},
		&interfaces.SwInterfaceSetMacAddress{}, &interfaces.SwInterfaceSetMacAddressReply{},
		&interfaces.HwInterfaceSetMtu{}, &interfaces.HwInterfaceSetMtuReply{},
		&interfaces.SwInterfaceRxPlacementDump{}, &interfaces.SwInterfaceRxPlacementDetails{},
		&interfaces.SwInterfaceSetRxMode{}, &interfaces.SwInterfaceSetRxModeReply{},
		&interfaces.SwInterfaceSetFlags{}, &interfaces.SwInterfaceSetFlagsReply{},
		&interfaces.SwInterfaceAddDelAddress{}, &interfaces.SwInterfaceAddDelAddressReply{},
		&ip.IPAddressDump{}, &ip.IPAddressDetails{},
		&ip.IPRouteDump{}, &ip.IPRouteDetails{},
		&ip.IPRouteAddDel{}, &ip.IPRouteAddDelReply{},
		&session.SessionEnableDisableV2{}, &session.SessionEnableDisableV2Reply{},
		&session.AppNamespaceAddDelV4{}, &session.AppNamespaceAddDelV4Reply{},
	}
}

// dial connects, checks every message the agent will send or receive against VPP's message
// table (no message is sent for that: the table came with the handshake), then asks VPP's
// version. An *IncompatibleError means: stop, do not retry.
func (a *Agent) dial(ctx context.Context) (*vppConn, error) {
	ad := a.newAdapter(a.cfg.APISocket)
	conn, err := core.Connect(ad)
	if err != nil {
		return nil, fmt.Errorf("vpp: connect %s: %w", a.cfg.APISocket, err)
	}
	c := &vppConn{
		conn:       conn,
		timeout:    a.cfg.RequestTimeout,
		ifc:        interfaces.NewServiceClient(conn),
		ipc:        ip.NewServiceClient(conn),
		sess:       session.NewServiceClient(conn),
		vpe:        vpe.NewServiceClient(conn),
		mem:        memclnt.NewServiceClient(conn),
		dev:        dev.NewServiceClient(conn),
		rdma:       rdma.NewServiceClient(conn),
		afp:        afpacket.NewServiceClient(conn),
		dead:       make(chan struct{}),
		namespaces: map[string]appliedNamespace{},
	}
	if err := checkCompatibility(conn, append(coreMessages(), a.driver.messages()...)); err != nil {
		c.close()
		return nil, err
	}
	rep, err := invoke(ctx, c, &vpe.ShowVersion{}, c.vpe.ShowVersion)
	if err != nil {
		c.close()
		return nil, err
	}
	c.version = rep.Version
	if err := checkVersion(rep.Version, a.cfg.MinVersion, a.cfg.MaxVersion); err != nil {
		c.close()
		return nil, &IncompatibleError{Version: rep.Version, err: err}
	}
	return c, nil
}

// newSocketAdapter is govpp's socket client with the agent's name and handshake timeout.
func newSocketAdapter(cfg *Config) func(string) adapter.VppAPI {
	return func(socket string) adapter.VppAPI {
		c := socketclient.NewVppClient(socket)
		c.SetClientName("meshturbo-agent")
		c.SetConnectTimeout(cfg.ConnectTimeout)
		return c
	}
}

// checkCompatibility looks every message up in the table VPP sent with the handshake, as
// govpp's Channel.CheckCompatiblity does (the Channel API itself is deprecated), and collects
// the misses into govpp's api.CompatibilityError.
func checkCompatibility(conn *core.Connection, msgs []api.Message) error {
	var cerr api.CompatibilityError
	seen := map[string]bool{}
	for _, m := range msgs {
		id := m.GetMessageName() + "_" + m.GetCrcString()
		if seen[id] {
			continue
		}
		seen[id] = true
		if _, err := conn.GetMessageID(m); err != nil {
			var unknown *adapter.UnknownMsgError
			if !errors.As(err, &unknown) {
				return fmt.Errorf("vpp: check message %s: %w", id, err)
			}
			cerr.IncompatibleMessages = append(cerr.IncompatibleMessages, id)
			continue
		}
		cerr.CompatibleMessages = append(cerr.CompatibleMessages, id)
	}
	if len(cerr.IncompatibleMessages) == 0 {
		return nil
	}
	slices.Sort(cerr.IncompatibleMessages)
	return &IncompatibleError{Messages: cerr.IncompatibleMessages, err: &cerr}
}

// markDead records that a request went unanswered. govpp cannot be trusted with the
// connection after that: a late reply could land in a pooled reply channel and be read as the
// answer to a later request. The supervisor reconnects.
func (c *vppConn) markDead() { c.deadOnce.Do(func() { close(c.dead) }) }

func (c *vppConn) close() { c.conn.Disconnect() }

// usable fails fast once the connection is marked dead, instead of letting every further
// request of an apply wait out its timeout.
func (c *vppConn) usable(msg string) error {
	select {
	case <-c.dead:
		return &APIError{Message: msg, Err: fmt.Errorf("%w: an earlier request went unanswered", ErrNotConnected)}
	default:
		return nil
	}
}

// invoke sends one request, waits for its reply at most the request timeout, and names the
// message in any error. A non-zero retval arrives from govpp's generated client as
// api.VPPApiError and becomes an *APIError carrying it.
func invoke[Req api.Message, Rep any](ctx context.Context, c *vppConn, req Req,
	fn func(context.Context, Req) (Rep, error)) (Rep, error) {
	if err := c.usable(req.GetMessageName()); err != nil {
		var zero Rep
		return zero, err
	}
	rctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	rep, err := fn(rctx, req)
	if err != nil {
		var zero Rep
		return zero, c.wrap(rctx, req.GetMessageName(), err)
	}
	return rep, nil
}

// dump runs a dump request (govpp sends a control_ping after it; its reply ends the details)
// and collects the details.
func dump[D any, Req api.Message, S interface {
	Recv() (D, error)
	Close() error
}](ctx context.Context, c *vppConn, req Req, open func(context.Context, Req) (S, error)) ([]D, error) {
	if err := c.usable(req.GetMessageName()); err != nil {
		return nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	s, err := open(rctx, req)
	if err != nil {
		return nil, c.wrap(rctx, req.GetMessageName(), err)
	}
	var out []D
	for {
		d, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			_ = s.Close()
			return nil, c.wrap(rctx, req.GetMessageName(), err)
		}
		out = append(out, d)
	}
}

func (c *vppConn) wrap(ctx context.Context, msg string, err error) error {
	var verr api.VPPApiError
	if errors.As(err, &verr) {
		return &APIError{Message: msg, Retval: int32(verr), Err: err}
	}
	if ctx.Err() != nil {
		c.markDead()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return &APIError{Message: msg, Err: fmt.Errorf("%w within the request timeout (the connection will be re-established)", ErrNoReply)}
		}
		return &APIError{Message: msg, Err: ctx.Err()}
	}
	return &APIError{Message: msg, Err: err}
}
