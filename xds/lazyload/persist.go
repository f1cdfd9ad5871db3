package lazyload

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// The learned edges are kept in one small JSON file, written atomically (temp file, fsync,
// rename, fsync of the directory) whenever the edge set changed, at most once per persist
// interval, and on shutdown.
//
// Why a file and not a registry's KV store: lazy loading must work with any mix of registries
// (ZooKeeper-only and Eureka-only meshes have no KV store meshturbo could rely on), the state is
// small (about 150 bytes per edge: 10,000 edges are 1.5 MB), it is written by one process, and a
// restart must not depend on a registry being reachable — the registry may be the very thing
// that is down. On Kubernetes the file lives on a volume that survives the pod (see
// install/). A lost file costs only the learning: every call still succeeds through the
// fallback and the edges come back.

// loadState reads path; a missing file is an empty state.
func loadState(path string) (state, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return state{Version: stateVersion}, nil
	}
	if err != nil {
		return state{}, fmt.Errorf("read lazy-load state %s: %w", path, err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return state{}, fmt.Errorf("lazy-load state %s is not valid JSON (%v); move it away to start with no learned edges", path, err)
	}
	if st.Version != stateVersion {
		return state{}, fmt.Errorf("lazy-load state %s has format version %d, this meshturbo reads %d; move it away to start with no learned edges", path, st.Version, stateVersion)
	}
	return st, nil
}

// saveState writes st to path atomically.
func saveState(path string, st state) error {
	b, err := json.MarshalIndent(st, "", " ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("save lazy-load state: %w", err)
	}
	f, err := os.CreateTemp(dir, ".lazyload-*.tmp")
	if err != nil {
		return fmt.Errorf("save lazy-load state: %w", err)
	}
	tmp := f.Name()
	_, werr := f.Write(b)
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("save lazy-load state %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("save lazy-load state %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
