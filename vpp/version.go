package vpp

import (
	"fmt"
	"strconv"
	"strings"
)

// version is a VPP release number. VPP names releases YY.MM (25.02), with point releases
// 25.02.1; show_version decorates them: "25.02-release", "v25.02-rc0~12-g3f1c2a9".
type version struct{ major, minor, patch int }

func parseVersion(s string) (version, error) {
	t := strings.TrimPrefix(strings.TrimSpace(s), "v")
	if i := strings.IndexAny(t, "-~+ "); i >= 0 {
		t = t[:i]
	}
	parts := strings.Split(t, ".")
	if len(parts) < 2 || len(parts) > 3 {
		return version{}, fmt.Errorf("version %q is not YY.MM[.N]", s)
	}
	var n [3]int
	for i, p := range parts {
		v, err := strconv.Atoi(p)
		if err != nil || v < 0 {
			return version{}, fmt.Errorf("version %q is not YY.MM[.N]", s)
		}
		n[i] = v
	}
	return version{n[0], n[1], n[2]}, nil
}

func (v version) less(o version) bool {
	if v.major != o.major {
		return v.major < o.major
	}
	if v.minor != o.minor {
		return v.minor < o.minor
	}
	return v.patch < o.patch
}

func (v version) String() string {
	if v.patch != 0 {
		return fmt.Sprintf("%02d.%02d.%d", v.major, v.minor, v.patch)
	}
	return fmt.Sprintf("%02d.%02d", v.major, v.minor)
}

// checkVersion reports whether the version show_version returned lies in [min, max).
func checkVersion(reported, minV, maxV string) error {
	v, err := parseVersion(reported)
	if err != nil {
		return err
	}
	lo, _ := parseVersion(minV)
	hi, _ := parseVersion(maxV)
	if v.less(lo) || !v.less(hi) {
		return fmt.Errorf("VPP %s (%q) is outside the supported range [%s, %s)", v, reported, lo, hi)
	}
	return nil
}
