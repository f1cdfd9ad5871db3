package zookeeper

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
)

// CuratorInstance is one service instance as Apache Curator's ServiceDiscovery (and Spring
// Cloud Zookeeper, and Dubbo 3's application-level discovery) writes it to
// <base>/<name>/<id>.
type CuratorInstance struct {
	Name    string
	ID      string
	Address string // an IP address, canonical form
	// Port and SSLPort are 0 when absent; at least one is set.
	Port                uint16
	SSLPort             uint16
	RegistrationTimeUTC int64
	ServiceType         string
	// Enabled is the "enabled" field of Curator 5 (true when absent).
	Enabled bool
	// Metadata is the payload's "metadata" object when it has one (Spring Cloud Zookeeper,
	// Dubbo), else the payload's own top-level fields; scalar values only, as text.
	Metadata map[string]string
}

// ParseCuratorInstance decodes the JSON data of a Curator instance znode. The address must be
// a dialable IP address and port or sslPort a number in 1-65535. Errors wrap ErrBadJSON,
// ErrBadHost or ErrBadPort.
func ParseCuratorInstance(data []byte) (CuratorInstance, error) {
	var raw struct {
		Name                string          `json:"name"`
		ID                  string          `json:"id"`
		Address             string          `json:"address"`
		Port                *int64          `json:"port"`
		SSLPort             *int64          `json:"sslPort"`
		Payload             json.RawMessage `json:"payload"`
		RegistrationTimeUTC int64           `json:"registrationTimeUTC"`
		ServiceType         string          `json:"serviceType"`
		Enabled             *bool           `json:"enabled"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return CuratorInstance{}, fmt.Errorf("%w: %v", ErrBadJSON, err)
	}
	addr, err := netip.ParseAddr(raw.Address)
	if err != nil {
		return CuratorInstance{}, fmt.Errorf("%w: address %q", ErrBadHost, truncate(raw.Address))
	}
	if addr.Zone() != "" || addr.IsUnspecified() || addr.IsMulticast() {
		return CuratorInstance{}, fmt.Errorf("%w: address %q cannot be dialled from another host", ErrBadHost, truncate(raw.Address))
	}
	ci := CuratorInstance{
		Name:                raw.Name,
		ID:                  raw.ID,
		Address:             addr.Unmap().String(),
		RegistrationTimeUTC: raw.RegistrationTimeUTC,
		ServiceType:         raw.ServiceType,
		Enabled:             raw.Enabled == nil || *raw.Enabled,
		Metadata:            payloadMetadata(raw.Payload),
	}
	if ci.Port, err = jsonPort("port", raw.Port); err != nil {
		return CuratorInstance{}, err
	}
	if ci.SSLPort, err = jsonPort("sslPort", raw.SSLPort); err != nil {
		return CuratorInstance{}, err
	}
	if ci.Port == 0 && ci.SSLPort == 0 {
		return CuratorInstance{}, fmt.Errorf("%w: neither port nor sslPort is set", ErrBadPort)
	}
	return ci, nil
}

// jsonPort checks an optional port field: absent or null is 0, anything else must be 1-65535.
func jsonPort(field string, p *int64) (uint16, error) {
	if p == nil {
		return 0, nil
	}
	if *p < 1 || *p > 65535 {
		return 0, fmt.Errorf("%w: %s %d", ErrBadPort, field, *p)
	}
	return uint16(*p), nil
}

// payloadMetadata extracts labels from a payload: its "metadata" object if it has one, else
// its own fields but "@class". Strings are kept as they are, numbers and booleans as their
// JSON text; objects, arrays and nulls are left out.
func payloadMetadata(payload json.RawMessage) map[string]string {
	var obj map[string]json.RawMessage
	if len(payload) == 0 || json.Unmarshal(payload, &obj) != nil {
		return nil
	}
	if md, ok := obj["metadata"]; ok {
		var inner map[string]json.RawMessage
		if json.Unmarshal(md, &inner) == nil {
			obj = inner
		}
	}
	out := map[string]string{}
	for k, v := range obj {
		if k == "" || k == "@class" {
			continue
		}
		v = bytes.TrimSpace(v)
		switch {
		case len(v) == 0 || v[0] == '{' || v[0] == '[' || string(v) == "null":
		case v[0] == '"':
			var s string
			if json.Unmarshal(v, &s) == nil {
				out[k] = s
			}
		default:
			out[k] = string(v)
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// weightFromMetadata reads an optional "weight" metadata value, DefaultWeight otherwise.
func weightFromMetadata(md map[string]string) uint32 {
	s, ok := md["weight"]
	if !ok {
		return DefaultWeight
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return DefaultWeight
	}
	return uint32(min(max(n, 1), maxWeight))
}
