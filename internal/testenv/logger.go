package testenv

import (
	"bytes"
	"io"
	"log/slog"
	"sync"
	"testing"
)

// Logger returns a debug-level slog.Logger that writes to t.Log.
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(Writer(t), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// Writer returns a writer that passes each line written to it to t.Log (a last line without a
// newline when the test ends). It is safe for concurrent use; what is written after the test
// and its cleanups have finished (by goroutines that outlive it) is dropped instead of
// panicking.
func Writer(t testing.TB) io.Writer {
	w := &tbWriter{t: t}
	t.Cleanup(w.close)
	return w
}

type tbWriter struct {
	mu      sync.Mutex
	t       testing.TB
	partial []byte // the start of a line not yet ended
	closed  bool
}

func (w *tbWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return len(p), nil
	}
	data := p
	for {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break
		}
		line := data[:i]
		if len(w.partial) > 0 {
			line = append(w.partial, line...)
			w.partial = nil
		}
		w.t.Log(string(line))
		data = data[i+1:]
	}
	w.partial = append(w.partial, data...)
	return len(p), nil
}

func (w *tbWriter) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.partial) > 0 {
		w.t.Log(string(w.partial))
		w.partial = nil
	}
	w.closed = true
}
