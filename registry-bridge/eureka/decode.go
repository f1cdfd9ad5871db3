package eureka

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Instance statuses as Eureka names them (com.netflix.appinfo.InstanceInfo.InstanceStatus).
const (
	statusUp           = "UP"
	statusDown         = "DOWN"
	statusStarting     = "STARTING"
	statusOutOfService = "OUT_OF_SERVICE"
	statusUnknown      = "UNKNOWN"
)

// Delta action types (InstanceInfo.ActionType).
const (
	actionAdded    = "ADDED"
	actionModified = "MODIFIED"
	actionDeleted  = "DELETED"
)

// Reasons for entries that could not be read at all; see also the reasons in registry.go.
const (
	reasonMalformedApp      = "malformed application"
	reasonMalformedInstance = "malformed instance"
	reasonMissingApp        = "missing app name"
	reasonMissingID         = "missing instance id"
)

// document is one decoded answer of GET /apps or GET /apps/delta: the two share a shape.
type document struct {
	// HashCode is apps__hashcode, e.g. "DOWN_1_UP_3_"; HasHashCode is false when it is absent.
	HashCode    string
	HasHashCode bool
	// Apps maps an upper-case app name to its instances by instance ID. In a delta each
	// instance carries the action to apply.
	Apps map[string]map[string]*instance
	// Unreadable counts, per reason, entries that could not be keyed to an app and an
	// instance ID and so were dropped.
	Unreadable map[string]int
}

// instance is what the watcher keeps of one Eureka instance.
type instance struct {
	App        string // upper case
	ID         string
	IPAddr     string
	Status     string // one of the status constants
	Port       portSpec
	SecurePort portSpec
	Metadata   map[string]string
	Action     string // ADDED, MODIFIED or DELETED in deltas; ignored in full fetches
	// Dupes counts further entries with this app and ID in the same answer; they were dropped.
	Dupes int
}

// portSpec is Eureka's {"$": 8080, "@enabled": "true"}.
type portSpec struct {
	// Number is the port, -1 when it is not an integer. Range is checked later.
	Number int64
	// Enabled is @enabled; EnabledSet is false when the attribute is absent (Eureka's defaults
	// then apply: the non-secure port enabled, the secure one not).
	Enabled    bool
	EnabledSet bool
	Present    bool
}

// The wire shapes. String fields that Eureka always writes as strings are typed strictly: an
// instance where they are not is malformed. Everything with known variants is raw.
type (
	wireDocument struct {
		Applications *wireApplications `json:"applications"`
	}
	wireApplications struct {
		HashCode    json.RawMessage `json:"apps__hashcode"`
		Application json.RawMessage `json:"application"`
	}
	wireApplication struct {
		Name     json.RawMessage `json:"name"`
		Instance json.RawMessage `json:"instance"`
	}
	wireInstance struct {
		InstanceID string          `json:"instanceId"`
		HostName   string          `json:"hostName"`
		App        string          `json:"app"`
		IPAddr     string          `json:"ipAddr"`
		Status     string          `json:"status"`
		Port       json.RawMessage `json:"port"`
		SecurePort json.RawMessage `json:"securePort"`
		Metadata   json.RawMessage `json:"metadata"`
		ActionType string          `json:"actionType"`
	}
)

// decodeApps decodes Eureka's JSON for GET /apps and GET /apps/delta. It tolerates the
// quirks of Eureka's encoders: "application" and "instance" may be an array, a single object
// or null; port numbers may be numbers or strings; "@enabled" may be a string or a boolean;
// metadata may hold "@class" and non-string values. It fails only when the answer as a whole
// is not Eureka JSON; single bad entries are dropped and counted in Unreadable, duplicates in
// the kept instance's Dupes.
func decodeApps(data []byte) (*document, error) {
	var wd wireDocument
	if err := json.Unmarshal(data, &wd); err != nil {
		return nil, fmt.Errorf("decode eureka applications: %w", err)
	}
	if wd.Applications == nil {
		return nil, errors.New(`decode eureka applications: no "applications" object`)
	}
	doc := &document{Apps: map[string]map[string]*instance{}, Unreadable: map[string]int{}}
	if len(wd.Applications.HashCode) > 0 && !isNull(wd.Applications.HashCode) {
		if err := json.Unmarshal(wd.Applications.HashCode, &doc.HashCode); err != nil {
			return nil, fmt.Errorf("decode eureka applications: apps__hashcode: %w", err)
		}
		doc.HasHashCode = true
	}
	apps, err := oneOrMany(wd.Applications.Application)
	if err != nil {
		return nil, fmt.Errorf("decode eureka applications: application: %w", err)
	}
	for _, rawApp := range apps {
		doc.addApp(rawApp)
	}
	return doc, nil
}

func (d *document) addApp(raw json.RawMessage) {
	var wa wireApplication
	if err := json.Unmarshal(raw, &wa); err != nil {
		d.Unreadable[reasonMalformedApp]++
		return
	}
	var name string
	if len(wa.Name) > 0 && !isNull(wa.Name) {
		if err := json.Unmarshal(wa.Name, &name); err != nil {
			d.Unreadable[reasonMalformedApp]++
			return
		}
	}
	insts, err := oneOrMany(wa.Instance)
	if err != nil {
		d.Unreadable[reasonMalformedApp]++
		return
	}
	for _, rawInst := range insts {
		d.addInstance(name, rawInst)
	}
}

func (d *document) addInstance(appName string, raw json.RawMessage) {
	var wi wireInstance
	if err := json.Unmarshal(raw, &wi); err != nil {
		d.Unreadable[reasonMalformedInstance]++
		return
	}
	app := appName
	if app == "" {
		app = wi.App
	}
	app = strings.ToUpper(strings.TrimSpace(app))
	if app == "" {
		d.Unreadable[reasonMissingApp]++
		return
	}
	// Eureka's InstanceInfo.getId: the instance ID, else the host name.
	id := wi.InstanceID
	if id == "" {
		id = wi.HostName
	}
	if id == "" {
		d.Unreadable[reasonMissingID]++
		return
	}
	in := &instance{
		App:        app,
		ID:         id,
		IPAddr:     strings.TrimSpace(wi.IPAddr),
		Status:     normalizeStatus(wi.Status),
		Port:       decodePort(wi.Port),
		SecurePort: decodePort(wi.SecurePort),
		Metadata:   decodeMetadata(wi.Metadata),
		Action:     strings.ToUpper(wi.ActionType),
	}
	byID := d.Apps[app]
	if byID == nil {
		byID = map[string]*instance{}
		d.Apps[app] = byID
	}
	if first, dup := byID[id]; dup {
		first.Dupes++
		return
	}
	byID[id] = in
}

// normalizeStatus maps a status to Eureka's enum the way InstanceStatus.toEnum does: case
// does not matter, and anything unknown (or missing) is UNKNOWN.
func normalizeStatus(s string) string {
	switch u := strings.ToUpper(strings.TrimSpace(s)); u {
	case statusUp, statusDown, statusStarting, statusOutOfService, statusUnknown:
		return u
	default:
		return statusUnknown
	}
}

// decodePort reads {"$": 8080, "@enabled": "true"}, or a bare number or string.
func decodePort(raw json.RawMessage) portSpec {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || isNull(raw) {
		return portSpec{}
	}
	if raw[0] != '{' {
		return portSpec{Number: decodeInt(raw), Present: true}
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return portSpec{Number: -1, Present: true}
	}
	p := portSpec{Number: -1, Present: true}
	if n, ok := obj["$"]; ok {
		p.Number = decodeInt(n)
	}
	if e, ok := obj["@enabled"]; ok && !isNull(e) {
		p.EnabledSet = true
		p.Enabled = decodeBool(e)
	}
	return p
}

// decodeInt reads an integer written as a JSON number or string; -1 when it is neither.
func decodeInt(raw json.RawMessage) int64 {
	raw = bytes.TrimSpace(raw)
	s := string(raw)
	if len(raw) > 0 && raw[0] == '"' {
		if err := json.Unmarshal(raw, &s); err != nil {
			return -1
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return -1
	}
	return n
}

// decodeBool reads true/false written as a JSON boolean or string; anything else is false.
func decodeBool(raw json.RawMessage) bool {
	var b bool
	if json.Unmarshal(raw, &b) == nil {
		return b
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return strings.EqualFold(strings.TrimSpace(s), "true")
	}
	return false
}

// decodeMetadata keeps string values, and numbers and booleans as their JSON text. Eureka's
// "@class" marker, blank keys, nulls, objects and arrays are dropped. Metadata that is not an
// object is treated as empty: it is informational and never a reason to lose an instance.
func decodeMetadata(raw json.RawMessage) map[string]string {
	if len(raw) == 0 || isNull(raw) {
		return nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil
	}
	var out map[string]string
	for k, v := range obj {
		if strings.TrimSpace(k) == "" || k == "@class" {
			continue
		}
		v = bytes.TrimSpace(v)
		if len(v) == 0 {
			continue
		}
		var s string
		switch v[0] {
		case '"':
			if json.Unmarshal(v, &s) != nil {
				continue
			}
		case '{', '[', 'n':
			continue
		default: // number or boolean
			s = string(v)
		}
		if out == nil {
			out = make(map[string]string, len(obj))
		}
		out[k] = s
	}
	return out
}

// oneOrMany splits a JSON array into its elements; a single object is one element; null or
// absent is none. Anything else is an error.
func oneOrMany(raw json.RawMessage) ([]json.RawMessage, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || isNull(raw) {
		return nil, nil
	}
	switch raw[0] {
	case '[':
		var out []json.RawMessage
		if err := json.Unmarshal(raw, &out); err != nil {
			return nil, err
		}
		return out, nil
	case '{':
		return []json.RawMessage{raw}, nil
	default:
		return nil, fmt.Errorf("want an object or an array, got %.20q", raw)
	}
}

func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }
