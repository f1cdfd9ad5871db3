package lazyload

import (
	"errors"
	"io"
	"net/url"
	"strings"

	accesslogdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
)

// alsServer receives the fallback's access logs (envoy.service.accesslog.v3) and turns each
// entry into an observed edge: the caller's SPIFFE id names the workload, the fallback's
// upstream cluster names the destination host and port.
type alsServer struct {
	alsv3.UnimplementedAccessLogServiceServer
	c *Controller
}

var _ alsv3.AccessLogServiceServer = (*alsServer)(nil)

func (s *alsServer) StreamAccessLogs(stream alsv3.AccessLogService_StreamAccessLogsServer) error {
	fromPeer := false
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&alsv3.StreamAccessLogsResponse{})
		}
		if err != nil {
			return err
		}
		if id := msg.GetIdentifier(); id != nil {
			fromPeer = id.GetLogName() == peerLogName
		}
		for _, e := range msg.GetHttpLogs().GetLogEntry() {
			s.c.observe(e.GetCommonProperties(), protocolOf(e), fromPeer)
		}
		for _, e := range msg.GetTcpLogs().GetLogEntry() {
			s.c.observe(e.GetCommonProperties(), "TCP", fromPeer)
		}
	}
}

func protocolOf(e *accesslogdata.HTTPAccessLogEntry) string {
	if strings.HasPrefix(e.GetRequest().GetRequestHeaders()["content-type"], "application/grpc") {
		return "GRPC"
	}
	switch e.GetProtocolVersion() {
	case accesslogdata.HTTPAccessLogEntry_HTTP2:
		return "HTTP2"
	case accesslogdata.HTTPAccessLogEntry_HTTP3:
		return "HTTP3"
	default:
		return "HTTP"
	}
}

// peerIdentity returns the namespace and service account of the caller's SPIFFE id
// (spiffe://<trust domain>/ns/<ns>/sa/<sa>).
func peerIdentity(p *accesslogdata.AccessLogCommon, trustDomain string) (ns, sa string, ok bool) {
	for _, san := range p.GetTlsProperties().GetPeerCertificateProperties().GetSubjectAltName() {
		u, err := url.Parse(san.GetUri())
		if err != nil || u.Scheme != "spiffe" || (trustDomain != "" && u.Host != trustDomain) {
			continue
		}
		parts := strings.Split(strings.Trim(u.Path, "/"), "/")
		if len(parts) == 4 && parts[0] == "ns" && parts[2] == "sa" && parts[1] != "" && parts[3] != "" {
			return parts[1], parts[3], true
		}
	}
	return "", "", false
}
