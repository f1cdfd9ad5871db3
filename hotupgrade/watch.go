package hotupgrade

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// FileWatcher polls files (the Envoy binary, the bootstrap) and reports when one's content
// changes. It polls rather than using inotify so that every way a file gets replaced looks
// the same: written in place, renamed over, or swapped behind a symbolic link as Kubernetes
// does for a ConfigMap volume (file -> ..data/file, ..data -> ..<timestamp>, and an update
// renames a new ..data link over the old one). Each poll resolves the links and stats the
// file; only when what it finds (target, device, inode, size, mtime) differs from the last
// time, and has stayed so for one more interval (a binary being copied in is not used half
// written), is the file hashed; a change is reported when the hash differs from the last
// one reported. A file that is missing for a while (mid-swap, or deleted) is not a change.
type FileWatcher struct {
	cfg   WatchConfig
	files []*watchedFile
	stop  chan struct{}
	done  chan struct{}
	once  sync.Once
	polls atomic.Int64 // rounds polled, for tests
}

// WatchConfig configures a FileWatcher.
type WatchConfig struct {
	Paths []string
	// Interval between polls (default 1s).
	Interval time.Duration
	// OnChange is called, on the watcher's goroutine, with the path (as given) whose content
	// changed. It should not block for long (e.g. Trigger.Kick).
	OnChange func(path string)
	Logger   *slog.Logger
}

type fileStat struct {
	target   string
	dev, ino uint64
	size     int64
	mtime    time.Time
}

type watchedFile struct {
	path    string
	stat    fileStat
	sum     [sha256.Size]byte
	pending *fileStat // seen once, not yet settled
	missing bool
}

// NewFileWatcher reads every file once (each must exist now) and starts polling.
func NewFileWatcher(cfg WatchConfig) (*FileWatcher, error) {
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	if cfg.OnChange == nil {
		return nil, errors.New("hotupgrade: WatchConfig.OnChange is nil")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	w := &FileWatcher{cfg: cfg, stop: make(chan struct{}), done: make(chan struct{})}
	for _, p := range cfg.Paths {
		st, err := statResolved(p)
		if err != nil {
			return nil, fmt.Errorf("hotupgrade: watch %s: %w", p, err)
		}
		sum, err := hashFile(st.target)
		if err != nil {
			return nil, fmt.Errorf("hotupgrade: watch %s: %w", p, err)
		}
		w.files = append(w.files, &watchedFile{path: p, stat: st, sum: sum})
	}
	go w.run()
	return w, nil
}

// Close stops polling.
func (w *FileWatcher) Close() error {
	w.once.Do(func() { close(w.stop) })
	<-w.done
	return nil
}

func (w *FileWatcher) run() {
	defer close(w.done)
	tick := time.NewTicker(w.cfg.Interval)
	defer tick.Stop()
	for {
		select {
		case <-w.stop:
			return
		case <-tick.C:
		}
		for _, f := range w.files {
			if w.poll(f) {
				w.cfg.OnChange(f.path)
			}
		}
		w.polls.Add(1)
	}
}

// poll reports whether f's content changed since the last report.
func (w *FileWatcher) poll(f *watchedFile) bool {
	st, err := statResolved(f.path)
	if err != nil {
		if !f.missing {
			w.cfg.Logger.Warn("watched file unreadable; waiting for it", "path", f.path, "error", err)
		}
		f.missing, f.pending = true, nil
		return false
	}
	f.missing = false
	if st == f.stat {
		f.pending = nil
		return false
	}
	if f.pending == nil || *f.pending != st {
		f.pending = &st // changed: look again next time, when it has settled
		return false
	}
	sum, err := hashFile(st.target)
	if err != nil {
		return false
	}
	f.stat, f.pending = st, nil
	if sum == f.sum {
		return false // touched, or rewritten with the same bytes
	}
	f.sum = sum
	return true
}

func statResolved(path string) (fileStat, error) {
	target, err := filepath.EvalSymlinks(path)
	if err != nil {
		return fileStat{}, err
	}
	fi, err := os.Stat(target)
	if err != nil {
		return fileStat{}, err
	}
	if fi.IsDir() {
		return fileStat{}, fmt.Errorf("%s is a directory", target)
	}
	st := fileStat{target: target, size: fi.Size(), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.dev, st.ino = uint64(sys.Dev), sys.Ino
	}
	return st, nil
}

func hashFile(path string) ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	f, err := os.Open(path)
	if err != nil {
		return sum, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return sum, err
	}
	copy(sum[:], h.Sum(nil))
	return sum, nil
}

// Trigger runs upgrades one at a time, from any number of sources (a signal, a changed
// file): a Kick while none runs starts one; a Kick while one runs queues exactly one more,
// and further Kicks until that one starts are folded into it. The queued run reads its
// inputs when it starts, so it sees every change folded into it.
type Trigger struct {
	kick chan string
	run  func(ctx context.Context, reason string)
	ctx  context.Context
	stop context.CancelFunc
	done chan struct{}
}

// NewTrigger starts the loop that calls run for each (folded) Kick. Close cancels the ctx
// given to a running call and waits for it.
func NewTrigger(run func(ctx context.Context, reason string)) *Trigger {
	t := &Trigger{kick: make(chan string, 1), run: run, done: make(chan struct{})}
	t.ctx, t.stop = context.WithCancel(context.Background())
	go t.loop()
	return t
}

// Kick asks for a run; it reports false when one was already queued (this one folds into it).
func (t *Trigger) Kick(reason string) bool {
	select {
	case t.kick <- reason:
		return true
	default:
		return false
	}
}

func (t *Trigger) loop() {
	defer close(t.done)
	for {
		select {
		case <-t.ctx.Done():
			return
		case reason := <-t.kick:
			t.run(t.ctx, reason)
		}
	}
}

// Close stops the loop; a queued run is dropped.
func (t *Trigger) Close() error {
	t.stop()
	<-t.done
	return nil
}
