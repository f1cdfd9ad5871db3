package admin

import (
	"runtime"
	"runtime/debug"
)

// version is the release version, set at link time:
//
//	go build -ldflags "-X github.com/meshturbo/meshturbo/internal/admin.version=v0.3.0" ./cmd/...
//
// Without it the module version from the build info is used ("devel" for a source build).
var version string

// VersionInfo is what GET /v1/version serves, and what meshctl version prints.
type VersionInfo struct {
	Daemon    string `json:"daemon"`
	Version   string `json:"version"`
	Revision  string `json:"revision,omitempty"`
	Modified  bool   `json:"modified,omitempty"`
	BuildTime string `json:"build_time,omitempty"`
	GoVersion string `json:"go_version"`
	Platform  string `json:"platform"`
}

// BuildInfo describes this binary as daemon.
func BuildInfo(daemon string) VersionInfo {
	v := VersionInfo{Daemon: daemon, Version: version, GoVersion: runtime.Version(),
		Platform: runtime.GOOS + "/" + runtime.GOARCH}
	bi, ok := debug.ReadBuildInfo()
	if ok {
		if v.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				v.Revision = s.Value
			case "vcs.time":
				v.BuildTime = s.Value
			case "vcs.modified":
				v.Modified = s.Value == "true"
			}
		}
	}
	if v.Version == "" {
		v.Version = "devel"
	}
	return v
}
