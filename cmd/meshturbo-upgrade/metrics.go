package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshturbo/meshturbo/hotupgrade"
)

// collector exports the manager's status at scrape time.
type collector struct {
	m                                                         *hotupgrade.Manager
	epoch, upgrades, rollbacks, rejected, lastTotal, envoyVer *prometheus.Desc
	lastHandoff                                               *prometheus.Desc
}

func newCollector(m *hotupgrade.Manager) *collector {
	return &collector{
		m:         m,
		epoch:     prometheus.NewDesc("meshturbo_upgrade_epoch", "Hot-restart epoch of the serving Envoy.", nil, nil),
		upgrades:  prometheus.NewDesc("meshturbo_upgrade_upgrades_total", "Upgrades completed.", nil, nil),
		rollbacks: prometheus.NewDesc("meshturbo_upgrade_rollbacks_total", "Upgrades rolled back (the old Envoy kept serving).", nil, nil),
		rejected:  prometheus.NewDesc("meshturbo_upgrade_rejected_total", "Upgrades rejected by the precheck.", nil, nil),
		lastTotal: prometheus.NewDesc("meshturbo_upgrade_last_duration_seconds", "Duration of the last upgrade, start to old Envoy stopped.", []string{"outcome"}, nil),
		envoyVer:  prometheus.NewDesc("meshturbo_upgrade_envoy_info", "The serving Envoy (value 1).", []string{"version", "phase"}, nil),
		lastHandoff: prometheus.NewDesc("meshturbo_upgrade_last_handoff_info",
			"How the last upgrade handed the listeners over: hotrestart or reuseport (value 1).", []string{"handoff"}, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.epoch, c.upgrades, c.rollbacks, c.rejected, c.lastTotal, c.envoyVer, c.lastHandoff} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.m.Status()
	ch <- prometheus.MustNewConstMetric(c.epoch, prometheus.GaugeValue, float64(s.Epoch))
	ch <- prometheus.MustNewConstMetric(c.upgrades, prometheus.CounterValue, float64(s.Upgrades))
	ch <- prometheus.MustNewConstMetric(c.rollbacks, prometheus.CounterValue, float64(s.Rollbacks))
	ch <- prometheus.MustNewConstMetric(c.rejected, prometheus.CounterValue, float64(s.Rejected))
	ch <- prometheus.MustNewConstMetric(c.envoyVer, prometheus.GaugeValue, 1, s.Version, s.Phase)
	if s.Last != nil {
		ch <- prometheus.MustNewConstMetric(c.lastTotal, prometheus.GaugeValue, float64(s.Last.TotalMS)/1000, s.Last.Outcome)
		if s.Last.Handoff != "" {
			ch <- prometheus.MustNewConstMetric(c.lastHandoff, prometheus.GaugeValue, 1, s.Last.Handoff)
		}
	}
}
