package bridge

import (
	"context"
	"fmt"
	"path"

	"github.com/meshturbo/meshturbo/model"
)

// SourceOptions shape what one source contributes to the catalog.
type SourceOptions struct {
	// Include, when not empty, keeps only services whose host name matches one of the
	// patterns (path.Match syntax: "orders.*", "*.service.consul").
	Include []string
	// Exclude drops services whose host name matches one of the patterns.
	Exclude []string
	// IstioNamespace puts the source's ServiceEntries in this Istio namespace instead of the
	// default one.
	IstioNamespace string
}

func (o SourceOptions) validate() error {
	for _, p := range append(append([]string{}, o.Include...), o.Exclude...) {
		if _, err := path.Match(p, ""); err != nil {
			return fmt.Errorf("pattern %q: %w", p, err)
		}
	}
	if o.IstioNamespace != "" && !model.ValidHostname(o.IstioNamespace) {
		return fmt.Errorf("istio namespace %q is not a DNS-1123 name", o.IstioNamespace)
	}
	return nil
}

// WithOptions wraps w so that what it publishes is filtered and placed as opts says.
func WithOptions(w Watcher, opts SourceOptions) (Watcher, error) {
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("source %s: %w", w.Source(), err)
	}
	return &shaped{Watcher: w, opts: opts}, nil
}

type shaped struct {
	Watcher
	opts SourceOptions
}

// Health passes the wrapped watcher's health through.
func (s *shaped) Health() Health {
	if hr, ok := s.Watcher.(HealthReporter); ok {
		return hr.Health()
	}
	return Health{Connected: true}
}

// Skipped passes the wrapped watcher's skipped entries through, but for services the
// options leave out anyway.
func (s *shaped) Skipped() []model.Skipped {
	sr, ok := s.Watcher.(SkipReporter)
	if !ok {
		return nil
	}
	var out []model.Skipped
	for _, sk := range sr.Skipped() {
		if sk.Hostname == "" || s.keep(sk.Hostname) {
			out = append(out, sk)
		}
	}
	return out
}

var (
	_ HealthReporter = (*shaped)(nil)
	_ SkipReporter   = (*shaped)(nil)
)

func (s *shaped) Run(ctx context.Context, publish func([]model.Service)) error {
	return s.Watcher.Run(ctx, func(svcs []model.Service) {
		out := make([]model.Service, 0, len(svcs))
		for _, svc := range svcs {
			if !s.keep(svc.Hostname) {
				continue
			}
			if s.opts.IstioNamespace != "" {
				svc.Namespace = s.opts.IstioNamespace
			}
			out = append(out, svc)
		}
		publish(out)
	})
}

func (s *shaped) keep(host string) bool {
	for _, p := range s.opts.Exclude {
		if ok, _ := path.Match(p, host); ok {
			return false
		}
	}
	if len(s.opts.Include) == 0 {
		return true
	}
	for _, p := range s.opts.Include {
		if ok, _ := path.Match(p, host); ok {
			return true
		}
	}
	return false
}
