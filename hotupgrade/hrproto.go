package hotupgrade

import (
	"encoding/binary"
	"math"

	"google.golang.org/protobuf/encoding/protowire"
)

// Envoy's hot-restart messages (source/server/hot_restart.proto): an 8-byte big-endian length,
// then a HotRestartMessage, sent over SOCK_DGRAM unix sockets in chunks of at most 4096 bytes.
// The relay reads only the first bytes of a message, enough to tell its kind, and builds the
// few replies it answers itself.
//
//	message HotRestartMessage {
//	  oneof requestreply { Request request = 1; Reply reply = 2; }
//	  bool didnt_recognize_your_last_message = 3;
//	}
//	Request: pass_listen_socket = 1, shutdown_admin = 2, stats = 3, drain_listeners = 4,
//	         terminate = 5, forwarded_udp_packet = 6
//	Reply:   pass_listen_socket = 1 { int32 fd = 1 }, shutdown_admin = 2, stats = 3

// hrChunk is the most Envoy puts in one datagram (MaxSendmsgSize): only the last datagram of
// a message is shorter.
const hrChunk = 4096

type hrKind int

const (
	hrUnknown hrKind = iota
	reqPassListenSocket
	reqShutdownAdmin
	reqStats
	reqDrainListeners
	reqTerminate
	reqForwardedUDP
	replyPassListenSocket
	replyShutdownAdmin
	replyStats
)

func (k hrKind) String() string {
	switch k {
	case reqPassListenSocket:
		return "PassListenSocket"
	case reqShutdownAdmin:
		return "ShutdownAdmin"
	case reqStats:
		return "Stats"
	case reqDrainListeners:
		return "DrainListeners"
	case reqTerminate:
		return "Terminate"
	case reqForwardedUDP:
		return "ForwardedUdpPacket"
	case replyPassListenSocket:
		return "PassListenSocket reply"
	case replyShutdownAdmin:
		return "ShutdownAdmin reply"
	case replyStats:
		return "Stats reply"
	}
	return "unknown"
}

// expectsReply tells whether the sender of a request blocks until the parent answers.
func (k hrKind) expectsReply() bool {
	return k == reqPassListenSocket || k == reqShutdownAdmin || k == reqStats
}

// hrHeader reads the first datagram of a message: the whole message length (header
// included) and its kind. It needs only the leading bytes, so a long Stats reply split over
// several datagrams is classified by its first one.
func hrHeader(b []byte) (total int, kind hrKind, ok bool) {
	if len(b) < 8 {
		return 0, hrUnknown, false
	}
	n := binary.BigEndian.Uint64(b[:8])
	if n > 1<<30 {
		return 0, hrUnknown, false
	}
	total = 8 + int(n)
	p := b[8:]
	num, typ, m := protowire.ConsumeTag(p)
	if m < 0 || typ != protowire.BytesType || (num != 1 && num != 2) {
		return total, hrUnknown, true
	}
	p = p[m:]
	if _, m = protowire.ConsumeVarint(p); m < 0 {
		return total, hrUnknown, true
	}
	p = p[m:]
	inner, _, m := protowire.ConsumeTag(p)
	if m < 0 {
		return total, hrUnknown, true
	}
	if num == 1 {
		if inner >= 1 && inner <= 6 {
			return total, hrKind(inner), true
		}
		return total, hrUnknown, true
	}
	if inner >= 1 && inner <= 3 {
		return total, replyPassListenSocket + hrKind(inner-1), true
	}
	return total, hrUnknown, true
}

// hrRequest builds a request message with an empty body, e.g. for tests.
func hrRequest(kind hrKind) []byte {
	return hrMessage(1, int(kind), nil)
}

// hrReply builds the reply the relay gives in the parent's place when the parent is gone:
// empty stats, a zero start time, or "no socket to pass" (fd -1), on which Envoy binds a
// socket of its own.
func hrReply(req hrKind) []byte {
	switch req {
	case reqPassListenSocket:
		var fd []byte
		fd = protowire.AppendTag(fd, 1, protowire.VarintType)
		fd = protowire.AppendVarint(fd, math.MaxUint64) // int32 -1: proto sign-extends negative int32s
		return hrMessage(2, 1, fd)
	case reqShutdownAdmin:
		return hrMessage(2, 2, nil)
	case reqStats:
		return hrMessage(2, 3, nil)
	}
	return nil
}

func hrMessage(outer, inner int, body []byte) []byte {
	var in []byte
	in = protowire.AppendTag(in, protowire.Number(inner), protowire.BytesType)
	in = protowire.AppendBytes(in, body)
	var msg []byte
	msg = protowire.AppendTag(msg, protowire.Number(outer), protowire.BytesType)
	msg = protowire.AppendBytes(msg, in)
	out := make([]byte, 8, 8+len(msg))
	binary.BigEndian.PutUint64(out, uint64(len(msg)))
	return append(out, msg...)
}

// hrStats reads the gauges out of a whole Stats reply:
//
//	Reply.Stats { uint64 memory_allocated = 1; uint64 num_connections = 2;
//	              map<string, uint64> counter_deltas = 3; map<string, uint64> gauges = 4; ... }
func hrStats(msg []byte) (gauges map[string]uint64, ok bool) {
	if len(msg) < 8 {
		return nil, false
	}
	b := msg[8:]
	descend := func(want protowire.Number) bool {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || num != want || typ != protowire.BytesType {
			return false
		}
		v, m := protowire.ConsumeBytes(b[n:])
		if m < 0 {
			return false
		}
		b = v
		return true
	}
	if !descend(2) || !descend(3) {
		return nil, false
	}
	gauges = map[string]uint64{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, false
		}
		b = b[n:]
		if num != 4 || typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return nil, false
			}
			b = b[n:]
			continue
		}
		entry, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return nil, false
		}
		b = b[n:]
		var key string
		var val uint64
		for len(entry) > 0 {
			en, et, m := protowire.ConsumeTag(entry)
			if m < 0 {
				return nil, false
			}
			entry = entry[m:]
			switch {
			case en == 1 && et == protowire.BytesType:
				k, m := protowire.ConsumeBytes(entry)
				if m < 0 {
					return nil, false
				}
				key, entry = string(k), entry[m:]
			case en == 2 && et == protowire.VarintType:
				v, m := protowire.ConsumeVarint(entry)
				if m < 0 {
					return nil, false
				}
				val, entry = v, entry[m:]
			default:
				if m = protowire.ConsumeFieldValue(en, et, entry); m < 0 {
					return nil, false
				}
				entry = entry[m:]
			}
		}
		gauges[key] = val
	}
	return gauges, true
}
