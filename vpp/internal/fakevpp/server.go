// Package fakevpp is a stand-in for VPP's binary API socket (/run/vpp/api.sock), for tests
// that cannot run VPP. It speaks VPP's socket wire protocol — each message framed by a 16-byte
// header whose bytes 8-11 carry the big-endian length, the sockclnt_create handshake that hands
// the client the message table (name_crc → id), sockclnt_delete, control_ping — so that
// govpp's real socket client talks to it unmodified. Requests are answered by a small model of
// VPP (see VPP) that keeps interfaces, addresses, routes, devices, the session layer and app
// namespaces, and refuses what VPP refuses.
//
// Tests can read the requests the server received in order (the message plan), make a message
// fail with a VPP return value or go unanswered, advertise a different CRC, and restart the
// "VPP" (drop every connection, forget all state, listen again).
package fakevpp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"

	"go.fd.io/govpp/api"
	afpacket "go.fd.io/govpp/binapi/af_packet"
	"go.fd.io/govpp/binapi/dev"
	interfaces "go.fd.io/govpp/binapi/interface"
	"go.fd.io/govpp/binapi/ip"
	"go.fd.io/govpp/binapi/memclnt"
	"go.fd.io/govpp/binapi/rdma"
	"go.fd.io/govpp/binapi/session"
	"go.fd.io/govpp/binapi/vpe"
	"go.fd.io/govpp/codec"
)

// sockclntCreateID is the message id govpp's socket client sends sockclnt_create with before
// it knows the table (VPP gives it this id too).
const sockclntCreateID = 15

// Option configures a Server.
type Option func(*Server)

// WithVersion sets the version show_version reports (default "25.02-release").
func WithVersion(v string) Option { return func(s *Server) { s.version = v } }

// WithCRC advertises msg under crc instead of the CRC govpp's binapi was generated with, as a
// VPP with a changed message would.
func WithCRC(msg, crc string) Option { return func(s *Server) { s.crcOverride[msg] = crc } }

// WithoutMessages leaves messages out of the table, as a VPP without the plugin would.
func WithoutMessages(names ...string) Option {
	return func(s *Server) {
		for _, n := range names {
			s.omit[n] = true
		}
	}
}

// WithLogf sends the server's diagnostics to logf (e.g. t.Logf).
func WithLogf(logf func(string, ...any)) Option { return func(s *Server) { s.logf = logf } }

// Server is a fake VPP binary API socket.
type Server struct {
	path        string
	version     string
	crcOverride map[string]string
	omit        map[string]bool
	logf        func(string, ...any)

	// the message table, fixed at New
	byID   map[uint16]reflect.Type
	idOf   map[string]uint16 // message name → id
	types  map[string]reflect.Type
	table  []memclnt.MessageTableEntry
	pingID uint16

	mu         sync.Mutex
	ln         *net.UnixListener
	conns      map[net.Conn]struct{}
	wg         sync.WaitGroup
	vpp        *VPP
	plan       []string
	seen       []string
	faults     map[string]*fault
	nextClient uint32
	starts     int
}

type fault struct {
	retval int32
	drop   bool
	times  int // 0: every time
}

// New starts a fake VPP listening on the unix socket path.
func New(path string, opts ...Option) (*Server, error) {
	s := &Server{
		path:        path,
		version:     "25.02-release",
		crcOverride: map[string]string{},
		omit:        map[string]bool{},
		logf:        func(string, ...any) {},
		byID:        map[uint16]reflect.Type{},
		idOf:        map[string]uint16{},
		types:       map[string]reflect.Type{},
		conns:       map[net.Conn]struct{}{},
		faults:      map[string]*fault{},
	}
	for _, o := range opts {
		o(s)
	}
	s.buildTable()
	s.vpp = newVPP(s.version)
	if err := s.listen(); err != nil {
		return nil, err
	}
	return s, nil
}

// Path is the socket path.
func (s *Server) Path() string { return s.path }

func (s *Server) buildTable() {
	var msgs []api.Message
	for _, all := range [][]api.Message{
		memclnt.AllMessages(), vpe.AllMessages(), interfaces.AllMessages(), ip.AllMessages(),
		session.AllMessages(), dev.AllMessages(), rdma.AllMessages(), afpacket.AllMessages(),
	} {
		msgs = append(msgs, all...)
	}
	// govpp's socket client takes the id of the last table entry starting "sockclnt_delete_" as
	// sockclnt_delete's, so sockclnt_delete_reply must come before it (VPP's table order is a
	// hash walk; a client that picks the reply's id just waits out its disconnect timeout).
	slices.SortStableFunc(msgs, func(x, y api.Message) int {
		rank := func(m api.Message) int {
			if m.GetMessageName() == "sockclnt_delete" {
				return 1
			}
			return 0
		}
		return rank(x) - rank(y)
	})
	next := uint16(16)
	for _, m := range msgs {
		name := m.GetMessageName()
		if _, dup := s.types[name]; dup {
			continue
		}
		s.types[name] = reflect.TypeOf(m).Elem()
		if s.omit[name] {
			continue
		}
		id := next
		if name == "sockclnt_create" {
			id = sockclntCreateID
		} else {
			next++
		}
		crc := m.GetCrcString()
		if c, ok := s.crcOverride[name]; ok {
			crc = c
		}
		s.byID[id] = reflect.TypeOf(m).Elem()
		s.idOf[name] = id
		s.table = append(s.table, memclnt.MessageTableEntry{Index: id, Name: name + "_" + crc})
	}
	s.pingID = s.idOf["control_ping"]
}

func (s *Server) listen() error {
	_ = os.Remove(s.path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("fakevpp: listen %s: %w", s.path, err)
	}
	ln.SetUnlinkOnClose(true)
	s.mu.Lock()
	s.ln = ln
	s.starts++
	s.mu.Unlock()
	s.wg.Add(1)
	go s.accept(ln)
	return nil
}

func (s *Server) accept(ln *net.UnixListener) {
	defer s.wg.Done()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.ln != ln { // closed meanwhile
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.nextClient++
		client := s.nextClient
		s.mu.Unlock()
		s.wg.Add(1)
		go s.serve(c, client)
	}
}

// Close stops the server and closes every connection.
func (s *Server) Close() error {
	s.stop()
	return nil
}

func (s *Server) stop() {
	s.mu.Lock()
	ln := s.ln
	s.ln = nil
	conns := s.conns
	s.conns = map[net.Conn]struct{}{}
	s.mu.Unlock()
	if ln != nil {
		ln.Close()
	}
	for c := range conns {
		c.Close()
	}
	s.wg.Wait()
}

// Restart emulates VPP restarting: every client connection drops, all state is forgotten
// (interfaces, addresses, routes, namespaces, the session layer) and the socket comes back.
func (s *Server) Restart() error {
	s.stop()
	s.mu.Lock()
	s.vpp = newVPP(s.version)
	s.mu.Unlock()
	return s.listen()
}

// Starts counts how often the server started listening (1 + restarts).
func (s *Server) Starts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.starts
}

// Plan returns the requests received so far, in order, as "name {fields}" lines, leaving out
// the connection handshake (sockclnt_create, sockclnt_delete) and control_ping, which govpp
// sends after every dump and liveness probes send at their own pace.
func (s *Server) Plan() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.plan)
}

// ResetPlan forgets the requests received so far.
func (s *Server) ResetPlan() {
	s.mu.Lock()
	s.plan = nil
	s.mu.Unlock()
}

// Seen returns the names of every message received, handshake and pings included.
func (s *Server) Seen() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.seen)
}

// Fail makes the next times requests named msg (every one when times is 0) fail with retval
// without changing state.
func (s *Server) Fail(msg string, retval int32, times int) {
	s.mu.Lock()
	s.faults[msg] = &fault{retval: retval, times: times}
	s.mu.Unlock()
}

// Drop makes the next times requests named msg (every one when times is 0) go unanswered.
func (s *Server) Drop(msg string, times int) {
	s.mu.Lock()
	s.faults[msg] = &fault{drop: true, times: times}
	s.mu.Unlock()
}

// ClearFaults removes every Fail and Drop.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	s.faults = map[string]*fault{}
	s.mu.Unlock()
}

// Do runs fn on the model under the server's lock, to seed or inspect state.
func (s *Server) Do(fn func(v *VPP)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(s.vpp)
}

func (s *Server) serve(c net.Conn, client uint32) {
	defer s.wg.Done()
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	for {
		data, err := readFrame(c)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.logf("fakevpp: read: %v", err)
			}
			return
		}
		replies, ok := s.handle(data, client)
		if !ok {
			return
		}
		for _, r := range replies {
			if err := writeFrame(c, r); err != nil {
				return
			}
		}
	}
}

// handle decodes one request and returns the encoded replies; ok is false when the
// connection should close (after sockclnt_delete).
func (s *Server) handle(data []byte, client uint32) (replies [][]byte, ok bool) {
	if len(data) < 2 {
		s.logf("fakevpp: short message (%d bytes)", len(data))
		return nil, true
	}
	id := binary.BigEndian.Uint16(data[:2])
	typ, known := s.byID[id]
	if !known {
		s.logf("fakevpp: unknown message id %d", id)
		return nil, true
	}
	req := reflect.New(typ).Interface().(api.Message)
	if err := codec.DecodeMsg(data, req); err != nil {
		s.logf("fakevpp: decode %s: %v", req.GetMessageName(), err)
		return nil, true
	}
	ctx, _ := codec.DecodeMsgContext(data, req.GetMessageType())
	name := req.GetMessageName()

	s.mu.Lock()
	defer s.mu.Unlock()
	s.seen = append(s.seen, name)
	switch name {
	case "sockclnt_create":
		return [][]byte{s.encode(&memclnt.SockclntCreateReply{
			Index: client, Count: uint16(len(s.table)), MessageTable: s.table,
		}, client, ctx)}, true
	case "sockclnt_delete":
		return [][]byte{s.encode(&memclnt.SockclntDeleteReply{}, client, ctx)}, false
	case "control_ping":
		return [][]byte{s.encode(&memclnt.ControlPingReply{ClientIndex: client, VpePID: 4242}, client, ctx)}, true
	}
	s.plan = append(s.plan, Describe(req))

	var out []api.Message
	if f := s.faults[name]; f != nil {
		if f.times > 0 {
			if f.times--; f.times == 0 {
				delete(s.faults, name)
			}
		}
		if f.drop {
			s.logf("fakevpp: dropping %s", name)
			return nil, true
		}
		rep, err := s.replyWithRetval(name, f.retval)
		if err != nil {
			s.logf("fakevpp: %v", err)
			return nil, true
		}
		out = []api.Message{rep}
	} else {
		var err error
		out, err = s.vpp.handle(req)
		if err != nil {
			s.logf("fakevpp: %s: %v", name, err)
			return nil, true
		}
	}
	for _, m := range out {
		replies = append(replies, s.encode(m, client, ctx))
	}
	return replies, true
}

// replyWithRetval builds the reply of request name carrying retval.
func (s *Server) replyWithRetval(name string, retval int32) (api.Message, error) {
	typ, ok := s.types[name+"_reply"]
	if !ok {
		return nil, fmt.Errorf("cannot fail %s: it has no _reply message", name)
	}
	v := reflect.New(typ)
	f := v.Elem().FieldByName("Retval")
	if !f.IsValid() {
		return nil, fmt.Errorf("cannot fail %s: its reply has no retval", name)
	}
	f.SetInt(int64(retval))
	return v.Interface().(api.Message), nil
}

func (s *Server) encode(m api.Message, client, ctx uint32) []byte {
	id, ok := s.idOf[m.GetMessageName()]
	if !ok {
		panic(fmt.Sprintf("fakevpp: reply %s is not in the table", m.GetMessageName()))
	}
	data, err := codec.EncodeMsg(m, id)
	if err != nil {
		panic(fmt.Sprintf("fakevpp: encode %s: %v", m.GetMessageName(), err))
	}
	// The header after the id depends on the message's first fields, as in VPP's C structs:
	// replies carry the context; messages defined with client_index and context (a few
	// replies are, such as dev_create_port_if_reply and sockclnt_create_reply) carry both.
	switch m.GetMessageType() {
	case api.ReplyMessage:
		binary.BigEndian.PutUint32(data[2:6], ctx)
	case api.RequestMessage:
		binary.BigEndian.PutUint32(data[2:6], client)
		binary.BigEndian.PutUint32(data[6:10], ctx)
	case api.EventMessage:
		binary.BigEndian.PutUint32(data[2:6], client)
	}
	return data
}

func readFrame(r io.Reader) ([]byte, error) {
	var hdr [16]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[8:12])
	if n > 1<<24 {
		return nil, fmt.Errorf("frame of %d bytes", n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(r, data); err != nil {
		return nil, err
	}
	return data, nil
}

func writeFrame(w io.Writer, data []byte) error {
	buf := make([]byte, 16+len(data))
	binary.BigEndian.PutUint32(buf[8:12], uint32(len(data)))
	copy(buf[16:], data)
	_, err := w.Write(buf)
	return err
}

// Describe renders a request for a plan line: "name {field:value …}". Routes are shortened
// to "prefix via nh dev N" so that plans stay readable.
func Describe(m api.Message) string {
	switch r := m.(type) {
	case *ip.IPRouteAddDel:
		return fmt.Sprintf("%s {IsAdd:%t IsMultipath:%t Table:%d Prefix:%s Paths:[%s]}", m.GetMessageName(),
			r.IsAdd, r.IsMultipath, r.Route.TableID, r.Route.Prefix, describePaths(r.Route))
	}
	return fmt.Sprintf("%s %+v", m.GetMessageName(), reflect.ValueOf(m).Elem().Interface())
}

func describePaths(r ip.IPRoute) string {
	var parts []string
	for _, p := range r.Paths {
		parts = append(parts, describePath(p))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}
