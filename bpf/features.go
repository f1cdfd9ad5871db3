package bpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Feature names one kernel capability the agent needs.
type Feature string

// The features New probes, in the order it probes them.
const (
	FeatureSockOps      Feature = "sockops program type"
	FeatureSkMsg        Feature = "sk_msg program type"
	FeatureSockHash     Feature = "sockhash map type"
	FeatureSkStorage    Feature = "socket local storage map type"
	FeatureSockHashPut  Feature = "bpf_sock_hash_update helper in sockops"
	FeatureRedirectHash Feature = "bpf_msg_redirect_hash helper in sk_msg"
	FeatureSkMsgStorage Feature = "bpf_sk_storage_get helper in sk_msg"
	FeatureSockMapLink  Feature = "bpf_link for sk_msg on a sockhash"
)

// AllFeatures lists every feature New needs.
var AllFeatures = []Feature{
	FeatureSockOps, FeatureSkMsg, FeatureSockHash, FeatureSkStorage,
	FeatureSockHashPut, FeatureRedirectHash, FeatureSkMsgStorage, FeatureSockMapLink,
}

// FeatureStatus is the result of probing one feature.
type FeatureStatus struct {
	Feature   Feature `json:"feature"`
	Supported bool    `json:"supported"`
	// Error says why the probe failed; empty when Supported.
	Error string `json:"error,omitempty"`
}

// MissingFeatureError reports a feature the kernel lacks. It wraps ebpf.ErrNotSupported.
type MissingFeatureError struct {
	Feature Feature
	Err     error
}

func (e *MissingFeatureError) Error() string {
	return fmt.Sprintf("bpf: kernel lacks %s: %v", e.Feature, e.Err)
}

func (e *MissingFeatureError) Unwrap() error { return e.Err }

// errForcedProbe is what a probe forced to fail by WithProbeFailure reports.
var errForcedProbe = fmt.Errorf("probe forced to fail: %w", ebpf.ErrNotSupported)

// Probe checks every feature in AllFeatures and returns one status per feature, plus a
// *MissingFeatureError for the first missing one (nil when all are there). A probe that
// fails for another reason than "not supported" (e.g. no permission) also counts as
// missing; its error is then wrapped as is, without ebpf.ErrNotSupported.
func Probe(opts ...Option) ([]FeatureStatus, error) {
	o := newOptions(opts)
	out := make([]FeatureStatus, 0, len(AllFeatures))
	var first error
	for _, f := range AllFeatures {
		err := o.forced[f]
		if err == nil {
			err = probeFeature(f)
		}
		st := FeatureStatus{Feature: f, Supported: err == nil}
		if err != nil {
			st.Error = err.Error()
			if first == nil {
				first = &MissingFeatureError{Feature: f, Err: err}
			}
		}
		out = append(out, st)
	}
	return out, first
}

func probeFeature(f Feature) error {
	switch f {
	case FeatureSockOps:
		return features.HaveProgramType(ebpf.SockOps)
	case FeatureSkMsg:
		return features.HaveProgramType(ebpf.SkMsg)
	case FeatureSockHash:
		return features.HaveMapType(ebpf.SockHash)
	case FeatureSkStorage:
		return features.HaveMapType(ebpf.SkStorage)
	case FeatureSockHashPut:
		return features.HaveProgramHelper(ebpf.SockOps, asm.FnSockHashUpdate)
	case FeatureRedirectHash:
		return features.HaveProgramHelper(ebpf.SkMsg, asm.FnMsgRedirectHash)
	case FeatureSkMsgStorage:
		return features.HaveProgramHelper(ebpf.SkMsg, asm.FnSkStorageGet)
	case FeatureSockMapLink:
		return probeSockMapLink()
	}
	return fmt.Errorf("unknown feature %q", f)
}

// probeSockMapLink attaches a trivial sk_msg program to a fresh, unpinned sockhash as a
// bpf_link (kernel 6.10 and later). Nothing is attached to any socket or cgroup.
func probeSockMapLink() error {
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Name: "mt_probe", Type: ebpf.SockHash, KeySize: 4, ValueSize: 8, MaxEntries: 1,
	})
	if err != nil {
		return fmt.Errorf("create sockhash: %w", err)
	}
	defer m.Close()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:       "mt_probe",
		Type:       ebpf.SkMsg,
		AttachType: ebpf.AttachSkMsgVerdict,
		License:    "Dual BSD/GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 1), // SK_PASS
			asm.Return(),
		},
	})
	if err != nil {
		return fmt.Errorf("load sk_msg program: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachRawLink(link.RawLinkOptions{
		Target: m.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict,
	})
	if err != nil {
		if errors.Is(err, unix.EINVAL) {
			// Kernels without sockmap links (before 6.10) refuse the attach type.
			return fmt.Errorf("attach as bpf_link: %v: %w", err, ebpf.ErrNotSupported)
		}
		return err
	}
	return l.Close()
}

// Features of the redirect mode, probed only when it is configured. Missing ones turn the
// mode off (State.Redirect.Off says which); acceleration goes on.
const (
	FeatureConnect4   Feature = "cgroup/connect4 program type (cgroup_sock_addr)"
	FeatureGetsockopt Feature = "cgroup/getsockopt program type (cgroup_sockopt)"
)

// RedirectFeatures lists the features of the redirect mode.
var RedirectFeatures = []Feature{FeatureConnect4, FeatureGetsockopt}

// probeRedirect probes RedirectFeatures, appends their statuses to the state and returns a
// *MissingFeatureError for the first missing one.
func (a *Agent) probeRedirect() error {
	var first error
	for _, f := range RedirectFeatures {
		err := a.opts.forced[f]
		if err == nil {
			switch f {
			case FeatureConnect4:
				err = features.HaveProgramType(ebpf.CGroupSockAddr)
			case FeatureGetsockopt:
				err = features.HaveProgramType(ebpf.CGroupSockopt)
			}
		}
		st := FeatureStatus{Feature: f, Supported: err == nil}
		if err != nil {
			st.Error = err.Error()
			if first == nil {
				first = &MissingFeatureError{Feature: f, Err: err}
			}
		}
		a.state.Features = append(a.state.Features, st)
	}
	return first
}
