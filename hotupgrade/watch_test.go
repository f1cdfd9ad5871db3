package hotupgrade

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// awaitChange waits for the watcher to report path, failing after a deadline.
func awaitChange(t *testing.T, ch <-chan string, want, what string) {
	t.Helper()
	select {
	case got := <-ch:
		if got != want {
			t.Fatalf("%s: change reported for %s, want %s", what, got, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no change reported for %s", what, want)
	}
}

// noChange checks that nothing was reported; call it after waitPolls.
func noChange(t *testing.T, ch <-chan string, what string) {
	t.Helper()
	select {
	case got := <-ch:
		t.Fatalf("%s: change reported for %s", what, got)
	default:
	}
}

// waitPolls waits until w has polled every file n more times.
func waitPolls(t *testing.T, w *FileWatcher, n int64) {
	t.Helper()
	want := w.polls.Load() + n
	deadline := time.Now().Add(5 * time.Second)
	for w.polls.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("watcher polled %d times in 5s, want %d", w.polls.Load(), want)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestFileWatcherSeesEveryWayAFileIsReplaced(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A ConfigMap volume: bootstrap.yaml -> ..data/bootstrap.yaml, ..data -> ..v1.
	for _, v := range []string{"..v1", "..v2"} {
		if err := os.Mkdir(filepath.Join(dir, v), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write("..v1/bootstrap.yaml", "one")
	write("..v2/bootstrap.yaml", "two")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Symlink("..v1", filepath.Join(dir, "..data")))
	must(os.Symlink("..data/bootstrap.yaml", filepath.Join(dir, "bootstrap.yaml")))
	write("envoy", "binary-1")
	cm, bin := filepath.Join(dir, "bootstrap.yaml"), filepath.Join(dir, "envoy")

	changes := make(chan string, 16)
	w, err := NewFileWatcher(WatchConfig{Paths: []string{bin, cm}, Interval: 10 * time.Millisecond,
		OnChange: func(p string) { changes <- p }})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()

	// Kubernetes' atomic update: a new ..data link renamed over the old one.
	must(os.Symlink("..v2", filepath.Join(dir, "..data_tmp")))
	must(os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")))
	awaitChange(t, changes, cm, "ConfigMap symlink swap")

	// A binary renamed over the old one.
	write("envoy.new", "binary-2")
	must(os.Rename(filepath.Join(dir, "envoy.new"), bin))
	awaitChange(t, changes, bin, "rename over the binary")

	// Touched, and rewritten with the same bytes: no change, however often it is polled.
	future := time.Now().Add(time.Hour)
	must(os.Chtimes(bin, future, future))
	write("..v2/bootstrap.yaml", "two")
	waitPolls(t, w, 5)
	noChange(t, changes, "touch and same-content rewrite")
	write("envoy", "binary-3")
	awaitChange(t, changes, bin, "write in place")

	// Missing for a while (deleted, then back with new content): one change, when it is back.
	must(os.Remove(bin))
	write("envoy.tmp", "binary-4")
	must(os.Rename(filepath.Join(dir, "envoy.tmp"), bin))
	awaitChange(t, changes, bin, "file back after it was missing")
	waitPolls(t, w, 5)
	noChange(t, changes, "after the file came back")
}

func TestTriggerQueuesExactlyOneMore(t *testing.T) {
	started := make(chan string, 10)
	release := make(chan struct{})
	tr := NewTrigger(func(ctx context.Context, reason string) {
		started <- reason
		select {
		case <-release:
		case <-ctx.Done():
		}
	})
	defer tr.Close()

	if !tr.Kick("first") {
		t.Fatal("first kick not taken")
	}
	if got := <-started; got != "first" {
		t.Fatalf("ran %q", got)
	}
	// While "first" runs: one kick queues, the rest fold into it.
	if !tr.Kick("second") {
		t.Error("kick while running was not queued")
	}
	for _, r := range []string{"third", "fourth"} {
		if tr.Kick(r) {
			t.Errorf("kick %q queued a second run", r)
		}
	}
	release <- struct{}{}
	if got := <-started; got != "second" {
		t.Fatalf("queued run %q, want second", got)
	}
	release <- struct{}{}
	// Nothing else was queued: a new kick runs right away, as the third run.
	if !tr.Kick("fifth") {
		t.Fatal("kick after the queue emptied not taken")
	}
	if got := <-started; got != "fifth" {
		t.Fatalf("ran %q, want fifth (third and fourth must have folded into second)", got)
	}
	close(release)
}
