package zookeeper

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/go-zookeeper/zk"

	"github.com/meshturbo/meshturbo/model"
)

// watchKind is one of ZooKeeper's watch types, as the client keeps them.
type watchKind uint8

const (
	watchChild watchKind = iota
	watchData            // set by GetW, and by ExistsW on a node that exists
	watchExist           // set by ExistsW on a node that does not exist
)

type watchKey struct {
	path string
	kind watchKind
}

func (r *run) disarm(path string, kinds ...watchKind) {
	for _, k := range kinds {
		delete(r.armed, watchKey{path, k})
	}
}

// isConnErr reports whether err is about the connection or session rather than the node.
func isConnErr(err error) bool {
	for _, e := range []error{zk.ErrConnectionClosed, zk.ErrNoServer, zk.ErrSessionExpired, zk.ErrClosing, zk.ErrSessionMoved} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// children lists a znode's children and leaves a child watch on it (one per path: a path whose
// watch has not fired yet is read without setting another). exists is false when the node is
// missing; then, if watchCreation, an exists watch notices its creation.
func (r *run) children(p string, watchCreation bool) (names []string, exists bool, err error) {
	for range 3 {
		key := watchKey{p, watchChild}
		if r.armed[key] {
			names, _, err = r.conn.Children(p)
		} else {
			names, _, _, err = r.conn.ChildrenW(p)
			if err == nil {
				r.armed[key] = true
			}
		}
		if !errors.Is(err, zk.ErrNoNode) {
			return names, err == nil, err
		}
		if !watchCreation || r.armed[watchKey{p, watchExist}] {
			return nil, false, nil
		}
		ok, _, _, err := r.conn.ExistsW(p)
		if err != nil {
			return nil, false, err
		}
		if !ok {
			r.armed[watchKey{p, watchExist}] = true
			return nil, false, nil
		}
		r.armed[watchKey{p, watchData}] = true
		// Created in between: list it.
	}
	return nil, false, fmt.Errorf("list %s: the node keeps appearing and disappearing", p)
}

// get reads a znode's data and leaves a data watch on it; exists is false when it is missing.
func (r *run) get(p string) (data []byte, exists bool, err error) {
	key := watchKey{p, watchData}
	if r.armed[key] {
		data, _, err = r.conn.Get(p)
	} else {
		data, _, _, err = r.conn.GetW(p)
		if err == nil {
			r.armed[key] = true
		}
	}
	if errors.Is(err, zk.ErrNoNode) {
		return nil, false, nil
	}
	return data, err == nil, err
}

// work brings the state up to date: everything when a full listing is due, else the paths
// that changed. On error the state keeps what it had and the work stays due.
func (r *run) work() error {
	if r.needFull {
		return r.fullList()
	}
	for _, p := range slices.Sorted(maps.Keys(r.dirty)) {
		if err := r.refresh(p); err != nil {
			return err
		}
		delete(r.dirty, p)
	}
	return nil
}

// fullList lists both layouts into new maps and swaps them in only if all of it succeeded.
func (r *run) fullList() error {
	dubbo := map[string]map[string]node{}
	curator := map[string]map[string]node{}
	if !r.cfg.DisableDubbo {
		dirs, _, err := r.children(r.cfg.DubboRoot, true)
		if err != nil {
			return fmt.Errorf("list %s: %w", r.cfg.DubboRoot, err)
		}
		for _, d := range dirs {
			if dubbo[d], err = r.listProviders(d); err != nil {
				return err
			}
		}
	}
	if !r.cfg.DisableCurator {
		names, _, err := r.children(r.cfg.CuratorRoot, true)
		if err != nil {
			return fmt.Errorf("list %s: %w", r.cfg.CuratorRoot, err)
		}
		for _, n := range names {
			if curator[n], err = r.listInstances(n, nil); err != nil {
				return err
			}
		}
	}
	r.dubbo, r.curator = dubbo, curator
	r.needFull = false
	r.synced = true
	clear(r.dirty) // the listing covered every change seen so far
	return nil
}

// refresh reads again what a watch event on p says changed.
func (r *run) refresh(p string) error {
	if !r.cfg.DisableDubbo {
		if p == r.cfg.DubboRoot {
			return r.refreshDubboRoot()
		}
		if rel, ok := strings.CutPrefix(p, r.cfg.DubboRoot+"/"); ok {
			dir, rest, _ := strings.Cut(rel, "/")
			if _, known := r.dubbo[dir]; known && rest == "providers" {
				nodes, err := r.listProviders(dir)
				if err != nil {
					return err
				}
				r.dubbo[dir] = nodes
			}
			return nil
		}
	}
	if !r.cfg.DisableCurator {
		if p == r.cfg.CuratorRoot {
			return r.refreshCuratorRoot()
		}
		if rel, ok := strings.CutPrefix(p, r.cfg.CuratorRoot+"/"); ok {
			name, id, hasID := strings.Cut(rel, "/")
			old, known := r.curator[name]
			switch {
			case !known || strings.Contains(id, "/"):
			case !hasID:
				nodes, err := r.listInstances(name, old)
				if err != nil {
					return err
				}
				r.curator[name] = nodes
			default:
				return r.refreshInstance(name, id)
			}
		}
	}
	return nil
}

func (r *run) refreshDubboRoot() error {
	dirs, _, err := r.children(r.cfg.DubboRoot, true)
	if err != nil {
		return fmt.Errorf("list %s: %w", r.cfg.DubboRoot, err)
	}
	next := make(map[string]map[string]node, len(dirs))
	for _, d := range dirs {
		nodes, known := r.dubbo[d]
		if !known {
			if nodes, err = r.listProviders(d); err != nil {
				return err
			}
		}
		next[d] = nodes
	}
	r.dubbo = next
	return nil
}

func (r *run) refreshCuratorRoot() error {
	names, _, err := r.children(r.cfg.CuratorRoot, true)
	if err != nil {
		return fmt.Errorf("list %s: %w", r.cfg.CuratorRoot, err)
	}
	next := make(map[string]map[string]node, len(names))
	for _, n := range names {
		nodes, known := r.curator[n]
		if !known {
			if nodes, err = r.listInstances(n, nil); err != nil {
				return err
			}
		}
		next[n] = nodes
	}
	r.curator = next
	return nil
}

// listProviders reads /<root>/<dir>/providers. A missing providers node is an interface
// without providers (an exists watch notices when it appears).
func (r *run) listProviders(dir string) (map[string]node, error) {
	p := r.cfg.DubboRoot + "/" + dir + "/providers"
	names, _, err := r.children(p, true)
	if errors.Is(err, zk.ErrNoAuth) {
		return map[string]node{"": skipNode(p, ReasonUnreadable, err.Error())}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", p, err)
	}
	iface, uerr := url.PathUnescape(dir)
	if uerr != nil {
		iface = dir
	}
	nodes := make(map[string]node, len(names))
	for _, n := range names {
		nodes[n] = r.dubboNode(p+"/"+n, iface, n)
	}
	return nodes, nil
}

// listInstances reads the instances of a Curator service. Instances in old whose data watch
// has not fired are unchanged and kept without reading them again.
func (r *run) listInstances(name string, old map[string]node) (map[string]node, error) {
	p := r.cfg.CuratorRoot + "/" + name
	ids, _, err := r.children(p, false)
	if errors.Is(err, zk.ErrNoAuth) {
		return map[string]node{"": skipNode(p, ReasonUnreadable, err.Error())}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", p, err)
	}
	nodes := make(map[string]node, len(ids))
	for _, id := range ids {
		ip := p + "/" + id
		if n, ok := old[id]; ok && r.armed[watchKey{ip, watchData}] {
			nodes[id] = n
			continue
		}
		data, exists, err := r.get(ip)
		switch {
		case errors.Is(err, zk.ErrNoAuth):
			nodes[id] = skipNode(ip, ReasonUnreadable, err.Error())
		case err != nil:
			return nil, fmt.Errorf("read %s: %w", ip, err)
		case exists:
			nodes[id] = r.curatorNode(ip, name, id, data)
		}
	}
	return nodes, nil
}

func (r *run) refreshInstance(name, id string) error {
	ip := r.cfg.CuratorRoot + "/" + name + "/" + id
	data, exists, err := r.get(ip)
	switch {
	case errors.Is(err, zk.ErrNoAuth):
		r.curator[name][id] = skipNode(ip, ReasonUnreadable, err.Error())
	case err != nil:
		return fmt.Errorf("read %s: %w", ip, err)
	case !exists:
		delete(r.curator[name], id)
	default:
		r.curator[name][id] = r.curatorNode(ip, name, id, data)
	}
	return nil
}

// dubboNode turns one provider znode name into an instance of its service.
func (r *run) dubboNode(p, iface, name string) node {
	prov, err := ParseDubboURL(name)
	if err != nil {
		return skipNode(p, reasonOf(err), err.Error())
	}
	if side := prov.Param("side"); side != "" && side != "provider" {
		return skipNode(p, ReasonNotProvider, "side="+side)
	}
	if prov.Param(ReverseParam) == "true" {
		return skipNode(p, ReasonOwn, "registered by meshturbo for non-mesh callers")
	}
	if !prov.Enabled() {
		return skipNode(p, ReasonDisabled, "enabled=false or disabled=true")
	}
	group, version := prov.Group(), prov.Version()
	host, err := DubboHostname(iface, group, version, r.cfg.DubboDomain)
	if err != nil {
		return skipNode(p, ReasonBadName, err.Error())
	}
	labels := map[string]string{}
	for _, k := range []string{"application", "group", "version", "release"} {
		if v := prov.Param(k); v != "" {
			labels[k] = v
		}
	}
	return node{path: p, inst: instance{
		key:      "dubbo:" + group + "/" + iface + ":" + version,
		host:     host,
		id:       net.JoinHostPort(prov.Host, strconv.Itoa(int(prov.Port))),
		addr:     prov.Host,
		port:     prov.Port,
		proto:    r.dubboProtocol(prov.Protocol),
		weight:   prov.Weight(),
		labels:   labels,
		locality: prov.Param("locality"),
		meshed:   prov.Param(r.cfg.MeshedKey) == "true",
		since:    prov.Timestamp(),
	}}
}

// dubboProtocol maps a Dubbo URL protocol to an Istio protocol.
func (r *run) dubboProtocol(proto string) model.Protocol {
	if p, ok := r.cfg.Protocols[proto]; ok {
		return p
	}
	switch proto {
	case "tri", "grpc":
		return model.ProtocolGRPC
	case "rest":
		return model.ProtocolHTTP
	default:
		return model.ParseProtocol(proto) // http, h2c, http2, https; dubbo and others are TCP
	}
}

// curatorNode turns one Curator instance znode into an instance of its service.
func (r *run) curatorNode(p, name, id string, data []byte) node {
	if len(data) > r.cfg.MaxNodeData {
		return skipNode(p, ReasonOversized, fmt.Sprintf("%d bytes of data, the limit is %d (Config.MaxNodeData)", len(data), r.cfg.MaxNodeData))
	}
	ci, err := ParseCuratorInstance(data)
	if err != nil {
		return skipNode(p, reasonOf(err), err.Error())
	}
	if !ci.Enabled {
		return skipNode(p, ReasonDisabled, "enabled is false")
	}
	if st, ok := ci.Metadata["instance_status"]; ok && !strings.EqualFold(st, "UP") {
		return skipNode(p, ReasonDisabled, "instance_status "+st)
	}
	host, err := CuratorHostname(name, r.cfg.CuratorDomain)
	if err != nil {
		return skipNode(p, ReasonBadName, err.Error())
	}
	port, proto := ci.Port, model.ProtocolHTTP
	if port == 0 {
		port, proto = ci.SSLPort, model.ProtocolHTTPS
	}
	if s := ci.Metadata["protocol"]; s != "" {
		proto = model.ParseProtocol(s)
	}
	return node{path: p, inst: instance{
		key:      "curator:" + name,
		host:     host,
		id:       id,
		addr:     ci.Address,
		port:     port,
		proto:    proto,
		weight:   weightFromMetadata(ci.Metadata),
		labels:   ci.Metadata,
		locality: ci.Metadata["locality"],
		meshed:   ci.Metadata[r.cfg.MeshedKey] == "true",
		since:    ci.RegistrationTimeUTC,
	}}
}
