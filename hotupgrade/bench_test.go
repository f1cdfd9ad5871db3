package hotupgrade

import (
	"fmt"
	"testing"
)

// BenchmarkUpgradesUnderLoad runs b.N consecutive upgrades under constant load (HTTP/1.1 with
// and without keep-alive, HTTP/2; 300 requests/s each) and fails on any failed request:
//
//	go test -run '^$' -bench UpgradesUnderLoad -benchtime 100x ./hotupgrade/
//
// 0 failures in 100 upgrades bounds the per-upgrade failure rate below ~3% (95%). The skew
// variant alternates Envoy 1.39 and 1.40 (upgrade, downgrade, ...).
func BenchmarkUpgradesUnderLoad(b *testing.B) {
	for _, skew := range []bool{false, true} {
		b.Run(map[bool]string{false: "same-version", true: "skew"}[skew], func(b *testing.B) {
			f := newFixture(b, "", nil)
			ls := startLoads(b, f.listen, 300, modeKeepAlive, modeClose, modeH2C)
			var drainMS, handoffMS int64
			b.ResetTimer()
			for i := range b.N {
				req := UpgradeRequest{Bootstrap: f.bootstrap(fmt.Sprint("v", i))}
				if skew && i%2 == 0 {
					req.Binary = f.deps.EnvoyOld
				} else if skew {
					req.Binary = f.deps.Envoy
				}
				res := f.upgrade(b, req)
				drainMS += res.DrainMS
				handoffMS += res.HandoffMS
			}
			b.StopTimer()
			var ok, failed, retried int64
			for _, l := range ls {
				o, n, r, _ := l.finish()
				ok, failed, retried = ok+o, failed+n, retried+r
			}
			ls.check(b)
			b.ReportMetric(float64(ok), "ok")
			b.ReportMetric(float64(failed), "failed")
			b.ReportMetric(float64(retried), "retried")
			b.ReportMetric(float64(handoffMS)/float64(b.N), "handoff-ms/op")
			b.ReportMetric(float64(drainMS)/float64(b.N), "drain-ms/op")
		})
	}
}
