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

// NewCatalog builds a catalog from services, normalizing and sorting them. When two services
// share a host name the earlier one in svcs wins and the later one is recorded as skipped;
// callers order svcs by source priority.
func NewCatalog(svcs []Service) *Catalog {
	c := &Catalog{Services: make([]Service, 0, len(svcs))}
	seen := make(map[string]Source, len(svcs))
	for _, s := range svcs {
		if winner, dup := seen[s.Hostname]; dup {
			c.Skipped = append(c.Skipped, Skipped{Source: s.Source, Hostname: s.Hostname, Code: SkipConflict,
				Reason: "host name also claimed by " + string(winner) + ", which has priority"})
			continue
		}
		seen[s.Hostname] = s.Source
		s.Normalize()
		c.Services = append(c.Services, s)
	}
	slices.SortFunc(c.Services, func(a, b Service) int { return cmp.Compare(a.Hostname, b.Hostname) })
	return c
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
