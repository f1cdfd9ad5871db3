package model

import (
	"cmp"
	"slices"
)

// Catalog is the merged view of every source: one Service per host name, sorted by host name,
// each normalized. Equal inputs give equal catalogs, so unchanged services translate to
// unchanged resources.
type Catalog struct {
	Services []Service
	// Skipped lists what was left out while building the catalog, with reasons.
	Skipped []Skipped
}

// Merge says what happens when two sources claim the same host name.
type Merge int

const (
	// MergePriority keeps the service of the source listed first; the other is skipped.
	MergePriority Merge = iota
	// MergeUnion serves the endpoints of both under the first source's ports, labels and
	// namespace; endpoints whose ports the first source does not declare are skipped.
	MergeUnion
)

// NewCatalog builds a catalog from services, normalizing and sorting them. Callers order
// svcs by source priority; host name conflicts are resolved by MergePriority.
func NewCatalog(svcs []Service) *Catalog { return NewCatalogMerged(svcs, MergePriority) }

// NewCatalogMerged is NewCatalog with an explicit conflict rule.
func NewCatalogMerged(svcs []Service, merge Merge) *Catalog {
	c := &Catalog{Services: make([]Service, 0, len(svcs))}
	index := make(map[string]int, len(svcs))
	for _, s := range svcs {
		i, dup := index[s.Hostname]
		if !dup {
			index[s.Hostname] = len(c.Services)
			s.Endpoints = slices.Clone(s.Endpoints)
			c.Services = append(c.Services, s)
			continue
		}
		winner := &c.Services[i]
		if merge == MergePriority {
			c.Skipped = append(c.Skipped, Skipped{Source: s.Source, Hostname: s.Hostname, Code: SkipConflict,
				Reason: "host name also claimed by " + string(winner.Source) + ", which has priority"})
			continue
		}
		for _, ep := range s.Endpoints {
			if reason := portsFit(winner, &ep); reason != "" {
				c.Skipped = append(c.Skipped, Skipped{Source: s.Source, Hostname: s.Hostname, ID: ep.ID, Code: SkipConflict, Reason: reason})
				continue
			}
			winner.Endpoints = append(winner.Endpoints, ep)
		}
	}
	for i := range c.Services {
		c.Services[i].Normalize()
	}
	slices.SortFunc(c.Services, func(a, b Service) int { return cmp.Compare(a.Hostname, b.Hostname) })
	return c
}

// portsFit reports why ep cannot join svc in a union, or "" when it can.
func portsFit(svc *Service, ep *Endpoint) string {
	for name := range ep.Ports {
		if !svc.hasPort(name) {
			return "port " + name + " is not a port of " + string(svc.Source) + "'s " + svc.Hostname + ", which has priority"
		}
	}
	return ""
}

// Lookup returns the service with the host name, or nil.
func (c *Catalog) Lookup(host string) *Service {
	i, ok := slices.BinarySearchFunc(c.Services, host, func(s Service, h string) int { return cmp.Compare(s.Hostname, h) })
	if !ok {
		return nil
	}
	return &c.Services[i]
}

// Changed returns the host names whose service differs between old and c: added, removed or
// changed in content. old may be nil.
func (c *Catalog) Changed(old *Catalog) []string {
	var out []string
	if old == nil {
		old = &Catalog{}
	}
	i, j := 0, 0
	for i < len(old.Services) || j < len(c.Services) {
		switch {
		case j == len(c.Services) || (i < len(old.Services) && old.Services[i].Hostname < c.Services[j].Hostname):
			out = append(out, old.Services[i].Hostname)
			i++
		case i == len(old.Services) || c.Services[j].Hostname < old.Services[i].Hostname:
			out = append(out, c.Services[j].Hostname)
			j++
		default:
			if !old.Services[i].Equal(&c.Services[j]) {
				out = append(out, c.Services[j].Hostname)
			}
			i++
			j++
		}
	}
	return out
}
