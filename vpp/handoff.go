package vpp

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/meshturbo/meshturbo/vpp/vcl"
)

// Hand-off file names inside <HandoffDir>/<sidecar ID>/.
const (
	VCLConfFile  = "vcl.conf"
	FragmentFile = "envoy-vcl.json"
)

// handoff writes what each sidecar needs into its directory under Config.HandoffDir: the
// vcl.conf for its namespace and the Envoy bootstrap fragment. A sidecar's directory appears
// once its namespace exists in VPP, so its presence means "ready".
type handoff struct {
	dir   string
	sizes VCLSizes
}

// sync writes the wanted sidecars' files where their content differs.
func (h *handoff) sync(d Desired, want map[string]namespaceSpec) error {
	if err := os.MkdirAll(h.dir, 0o755); err != nil {
		return fmt.Errorf("vpp: hand-off: %w", err)
	}
	for _, s := range d.Sidecars {
		spec := want[NamespaceID(s.ID)]
		conf, err := vcl.Conf(vcl.Params{
			AppSocketAPI:    spec.sockName,
			NamespaceID:     NamespaceID(s.ID),
			NamespaceSecret: spec.secret,
			SegmentSize:     h.sizes.SegmentSize,
			AddSegmentSize:  h.sizes.AddSegmentSize,
			RxFifoSize:      h.sizes.RxFifoSize,
			TxFifoSize:      h.sizes.TxFifoSize,
			EventQueueSize:  h.sizes.EventQueueSize,
		})
		if err != nil {
			return fmt.Errorf("vpp: hand-off for sidecar %s: %w", s.ID, err)
		}
		sdir := filepath.Join(h.dir, s.ID)
		if err := os.MkdirAll(sdir, 0o755); err != nil {
			return fmt.Errorf("vpp: hand-off: %w", err)
		}
		// The fragment first: vcl.conf marks the directory complete (see leftovers).
		if err := writeIfChanged(filepath.Join(sdir, FragmentFile), vcl.Fragment()); err != nil {
			return err
		}
		if err := writeIfChanged(filepath.Join(sdir, VCLConfFile), conf); err != nil {
			return err
		}
	}
	return nil
}

// leftovers returns the sidecar IDs that have a hand-off directory but no wanted namespace.
func (h *handoff) leftovers(want map[string]namespaceSpec) ([]string, error) {
	entries, err := os.ReadDir(h.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("vpp: hand-off: %w", err)
	}
	var out []string
	for _, e := range entries {
		if !e.IsDir() || !sidecarIDRE.MatchString(e.Name()) {
			continue
		}
		if _, ok := want[NamespaceID(e.Name())]; ok {
			continue
		}
		if _, err := os.Stat(filepath.Join(h.dir, e.Name(), VCLConfFile)); err != nil {
			continue // not a directory the agent wrote
		}
		out = append(out, e.Name())
	}
	slices.Sort(out)
	return out, nil
}

// remove deletes a sidecar's hand-off files and directory.
func (h *handoff) remove(sidecarID string) error {
	sdir := filepath.Join(h.dir, sidecarID)
	for _, f := range []string{VCLConfFile, FragmentFile} {
		if err := os.Remove(filepath.Join(sdir, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("vpp: hand-off: %w", err)
		}
	}
	if err := os.Remove(sdir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("vpp: hand-off: remove %s (files the agent did not write are in it?): %w", sdir, err)
	}
	return nil
}

// writeIfChanged replaces path with data atomically (rename), unless it already holds it.
// The files are world-readable: Envoy runs under its own uid, and each pod mounts only its own
// directory (the secret matters only for attaching over VPP's binary API; over the app socket
// API the namespace socket's permissions decide).
func writeIfChanged(path string, data []byte) error {
	if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, data) {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("vpp: hand-off: %w", err)
	}
	_, werr := tmp.Write(data)
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr, os.Chmod(tmp.Name(), 0o644)); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("vpp: hand-off: write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("vpp: hand-off: %w", err)
	}
	return nil
}

// namespaceSecret derives a namespace's secret from the agent's key: stable for a given key
// and namespace, different per namespace, not guessable without the key, never 0 (VPP's
// "no secret").
func namespaceSecret(key []byte, namespaceID string) uint64 {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(namespaceID))
	s := binary.BigEndian.Uint64(m.Sum(nil))
	if s == 0 {
		s = 1
	}
	return s
}
