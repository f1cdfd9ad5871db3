package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshturbo/meshturbo/model"
	bridge "github.com/meshturbo/meshturbo/registry-bridge"
	"github.com/meshturbo/meshturbo/xds"
)

// collector exports the bridge's and the xDS server's state at scrape time, so the packages
// need no metrics code of their own.
type collector struct {
	br  *bridge.Bridge
	srv *xds.Server

	services, endpoints, stale, lastContact, syncLatency, skipped, clients *prometheus.Desc
}

func newCollector(br *bridge.Bridge, srv *xds.Server) *collector {
	src := []string{"source"}
	return &collector{
		br: br, srv: srv,
		services:    prometheus.NewDesc("meshturbo_bridge_services", "Services served from the source.", src, nil),
		endpoints:   prometheus.NewDesc("meshturbo_bridge_endpoints", "Endpoints served from the source.", src, nil),
		stale:       prometheus.NewDesc("meshturbo_bridge_stale", "1 while the registry does not answer and its last snapshot is served.", src, nil),
		lastContact: prometheus.NewDesc("meshturbo_bridge_last_contact_timestamp_seconds", "When the registry last answered.", src, nil),
		syncLatency: prometheus.NewDesc("meshturbo_bridge_sync_latency_seconds", "Time from the source's last change to the catalog holding it.", src, nil),
		skipped:     prometheus.NewDesc("meshturbo_bridge_skipped_entries", "Entries of the current snapshot left out, by reason.", []string{"source", "reason"}, nil),
		clients:     prometheus.NewDesc("meshturbo_xds_clients", "Connected xDS clients (istiod instances).", nil, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.services, c.endpoints, c.stale, c.lastContact, c.syncLatency, c.skipped, c.clients} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	for _, st := range c.br.Status() {
		src := string(st.Source)
		ch <- prometheus.MustNewConstMetric(c.services, prometheus.GaugeValue, float64(st.Services), src)
		ch <- prometheus.MustNewConstMetric(c.endpoints, prometheus.GaugeValue, float64(st.Endpoints), src)
		stale := 0.0
		if st.Stale {
			stale = 1
		}
		ch <- prometheus.MustNewConstMetric(c.stale, prometheus.GaugeValue, stale, src)
		if !st.LastContact.IsZero() {
			ch <- prometheus.MustNewConstMetric(c.lastContact, prometheus.GaugeValue, float64(st.LastContact.UnixNano())/1e9, src)
		}
		ch <- prometheus.MustNewConstMetric(c.syncLatency, prometheus.GaugeValue, st.SyncLatency.Seconds(), src)
		byCode := map[model.SkipCode]int{}
		for _, s := range st.Skipped {
			byCode[s.Code]++
		}
		for code, n := range byCode {
			ch <- prometheus.MustNewConstMetric(c.skipped, prometheus.GaugeValue, float64(n), src, string(code))
		}
	}
	ch <- prometheus.MustNewConstMetric(c.clients, prometheus.GaugeValue, float64(len(c.srv.Clients())))
}
