package zookeeper

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
)

// Errors ParseDubboURL and ParseCuratorInstance wrap; the watcher turns them into skip reasons.
var (
	ErrBadEncoding = errors.New("bad percent-encoding")
	ErrBadURL      = errors.New("malformed provider URL")
	ErrTooLong     = errors.New("too long")
	ErrBadHost     = errors.New("host is not a dialable IP address")
	ErrBadPort     = errors.New("port is not a number in 1-65535")
	ErrBadJSON     = errors.New("malformed instance JSON")
	ErrBadName     = errors.New("no DNS-1123 host name can be made from it")
)

// MaxDubboURLLen bounds the provider URLs ParseDubboURL accepts (real ones are a few KiB).
const MaxDubboURLLen = 64 << 10

// DefaultWeight is the weight of a Dubbo provider without a weight parameter, as in Dubbo.
const DefaultWeight = 100

// maxWeight caps endpoint weights: Envoy needs the weights of a locality to sum within uint32.
const maxWeight = 1_000_000

// Provider is one provider URL from a Dubbo registry, e.g.
// "dubbo://10.0.0.5:20880/org.apache.dubbo.demo.DemoService?application=demo&version=1.0.0".
type Provider struct {
	// Protocol is the URL scheme, lowercased: "dubbo", "tri", "grpc", "rest", …
	Protocol string
	// Host is the provider's IP address in canonical form (IPv4-mapped IPv6 is unmapped).
	Host string
	Port uint16
	// Path is the URL path without its leading '/', usually the interface name.
	Path string
	// Interface is the "interface" parameter, or Path when there is none.
	Interface string
	// Params holds the query parameters as written (Dubbo does not decode them); the last of
	// repeated keys wins, as in Dubbo.
	Params map[string]string
}

// ParseDubboURL parses a Dubbo provider URL. s is either the decoded URL or the znode name
// Dubbo writes (the URL percent-encoded as a whole, so without "://"), which is decoded first.
//
// It accepts user info ("user:pw@host:port", dropped), bracketed IPv6 hosts ("[fd00::1]:20880")
// and unbracketed ones with the port after the last colon ("fd00::1:20880"). The host must be
// an IP address that can be dialled (not a host name, not 0.0.0.0, not multicast, no zone);
// the port must be 1-65535; there must be an interface (path or "interface" parameter).
// Errors wrap ErrTooLong, ErrBadEncoding, ErrBadURL, ErrBadHost or ErrBadPort.
func ParseDubboURL(s string) (Provider, error) {
	if len(s) > MaxDubboURLLen {
		return Provider{}, fmt.Errorf("%w: %d bytes, the limit is %d", ErrTooLong, len(s), MaxDubboURLLen)
	}
	s = strings.TrimSpace(s)
	if !strings.Contains(s, "://") {
		dec, err := url.QueryUnescape(s)
		if err != nil {
			return Provider{}, fmt.Errorf("%w: %v", ErrBadEncoding, err)
		}
		s = strings.TrimSpace(dec)
	}
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return Provider{}, fmt.Errorf("%w: no scheme (want protocol://host:port/interface?params)", ErrBadURL)
	}
	scheme = strings.ToLower(scheme)
	if !validScheme(scheme) {
		return Provider{}, fmt.Errorf("%w: protocol %q", ErrBadURL, truncate(scheme))
	}
	authority, pathQuery := rest, ""
	if i := strings.IndexAny(rest, "/?"); i >= 0 {
		authority, pathQuery = rest[:i], rest[i:]
	}
	path, query, _ := strings.Cut(pathQuery, "?")
	path = strings.Trim(path, "/")
	if i := strings.LastIndexByte(authority, '@'); i >= 0 {
		authority = authority[i+1:]
	}
	host, port, err := splitHostPort(authority)
	if err != nil {
		return Provider{}, err
	}
	p := Provider{Protocol: scheme, Host: host, Port: port, Path: path, Params: parseParams(query)}
	p.Interface = p.Params["interface"]
	if p.Interface == "" {
		p.Interface = path
	}
	if p.Interface == "" {
		return Provider{}, fmt.Errorf("%w: no interface (empty path and no interface parameter)", ErrBadURL)
	}
	return p, nil
}

func validScheme(s string) bool {
	if s == "" || len(s) > 32 || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// splitHostPort splits "ip:port", "[ipv6]:port" or "ipv6:port" and validates both parts.
func splitHostPort(a string) (string, uint16, error) {
	var host, port string
	switch {
	case a == "":
		return "", 0, fmt.Errorf("%w: empty host", ErrBadHost)
	case a[0] == '[':
		end := strings.IndexByte(a, ']')
		if end < 0 {
			return "", 0, fmt.Errorf("%w: %q has no closing ']'", ErrBadHost, truncate(a))
		}
		host = a[1:end]
		after := a[end+1:]
		if !strings.HasPrefix(after, ":") {
			return "", 0, fmt.Errorf("%w: %q has no port", ErrBadPort, truncate(a))
		}
		port = after[1:]
	default:
		i := strings.LastIndexByte(a, ':')
		if i < 0 {
			return "", 0, fmt.Errorf("%w: %q has no port", ErrBadPort, truncate(a))
		}
		host, port = a[:i], a[i+1:]
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return "", 0, fmt.Errorf("%w: %q", ErrBadHost, truncate(host))
	}
	if addr.Zone() != "" || addr.IsUnspecified() || addr.IsMulticast() {
		return "", 0, fmt.Errorf("%w: %q cannot be dialled from another host", ErrBadHost, truncate(host))
	}
	n, err := parsePort(port)
	if err != nil {
		return "", 0, err
	}
	return addr.Unmap().String(), n, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" || len(s) > 5 {
		return 0, fmt.Errorf("%w: %q", ErrBadPort, truncate(s))
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("%w: %q", ErrBadPort, truncate(s))
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("%w: %q", ErrBadPort, s)
	}
	return uint16(n), nil
}

// parseParams splits "k=v&k2=v2" without decoding, as Dubbo's URL.valueOf does.
func parseParams(q string) map[string]string {
	params := map[string]string{}
	for part := range strings.SplitSeq(q, "&") {
		k, v, _ := strings.Cut(part, "=")
		if k == "" {
			continue
		}
		params[k] = v
	}
	return params
}

// truncate shortens s for error messages.
func truncate(s string) string {
	const n = 64
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// Param returns the parameter key, falling back to "default.<key>" as Dubbo does.
func (p Provider) Param(key string) string {
	if v, ok := p.Params[key]; ok {
		return v
	}
	return p.Params["default."+key]
}

// Group is the provider's service group ("" when none).
func (p Provider) Group() string { return p.Param("group") }

// Version is the provider's service version ("" when none; "0.0.0" counts as none, as in
// Dubbo's service keys).
func (p Provider) Version() string {
	if v := p.Param("version"); v != "0.0.0" {
		return v
	}
	return ""
}

// Weight is the "weight" parameter: DefaultWeight when absent or not an integer, at least 1
// (Dubbo sends some traffic even to weight 0 when nothing else is up, and Istio reads 0 as
// "unset"), at most 1,000,000.
func (p Provider) Weight() uint32 {
	s := p.Param("weight")
	if s == "" {
		return DefaultWeight
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return DefaultWeight
	}
	return uint32(min(max(n, 1), maxWeight))
}

// Enabled is false when the provider is switched off ("enabled=false" or "disabled=true").
func (p Provider) Enabled() bool {
	return !strings.EqualFold(p.Param("enabled"), "false") && !strings.EqualFold(p.Param("disabled"), "true")
}

// Timestamp is the "timestamp" parameter (registration time, Unix ms), 0 when absent.
func (p Provider) Timestamp() int64 {
	n, _ := strconv.ParseInt(p.Param("timestamp"), 10, 64)
	return n
}

// DubboHostname names the service of a Dubbo interface, group and version:
//
//	<interface labels>[.<group>][.v<version>].<domain>
//
// Each dot-separated segment of the interface becomes one label; the group and the version
// each become one label (their dots become '-'); the version label starts with "v" (added
// when missing); version "0.0.0" is no version. Labels are lowercased, every character other
// than a-z, 0-9 and '-' becomes '-', and leading and trailing '-' are trimmed; a label longer
// than 63 characters keeps its first 54 and ends with '-' and 8 hex digits of its hash. So
// org.apache.dubbo.demo.DemoService, group "prod", version "1.0.0", domain "dubbo" is
// "org.apache.dubbo.demo.demoservice.prod.v1-0-0.dubbo". Errors wrap ErrBadName.
func DubboHostname(iface, group, version, domain string) (string, error) {
	labels := segmentLabels(iface)
	if len(labels) == 0 {
		return "", fmt.Errorf("%w: interface %q", ErrBadName, truncate(iface))
	}
	if group != "" {
		g := dnsLabel(group)
		if g == "" {
			return "", fmt.Errorf("%w: group %q", ErrBadName, truncate(group))
		}
		labels = append(labels, g)
	}
	if version == "0.0.0" {
		version = ""
	}
	if version != "" {
		v := dnsLabel(version)
		if v == "" {
			return "", fmt.Errorf("%w: version %q", ErrBadName, truncate(version))
		}
		if v[0] != 'v' {
			v = dnsLabel("v" + v)
		}
		labels = append(labels, v)
	}
	return joinHost(labels, domain, iface)
}

// CuratorHostname names a Curator service: "<name labels>.<domain>", the name's segments made
// DNS labels as in DubboHostname. Errors wrap ErrBadName.
func CuratorHostname(name, domain string) (string, error) {
	labels := segmentLabels(name)
	if len(labels) == 0 {
		return "", fmt.Errorf("%w: service name %q", ErrBadName, truncate(name))
	}
	return joinHost(labels, domain, name)
}

func joinHost(labels []string, domain, from string) (string, error) {
	h := strings.Join(labels, ".") + "." + domain
	if len(h) > 253 {
		return "", fmt.Errorf("%w: %q gives %d characters, more than 253", ErrBadName, truncate(from), len(h))
	}
	return h, nil
}

// segmentLabels makes one DNS label of each dot-separated segment, dropping empty ones.
func segmentLabels(s string) []string {
	var out []string
	for seg := range strings.SplitSeq(s, ".") {
		if l := dnsLabel(seg); l != "" {
			out = append(out, l)
		}
	}
	return out
}

// dnsLabel makes s one DNS-1123 label, or "" when nothing usable is left.
func dnsLabel(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	for _, r := range strings.ToLower(s) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	l := strings.Trim(b.String(), "-")
	if len(l) <= 63 {
		return l
	}
	h := fnv.New32a()
	h.Write([]byte(s))
	return fmt.Sprintf("%s-%08x", strings.TrimRight(l[:54], "-"), h.Sum32())
}
