package testenv

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

func TestTallyCountsAndKeepsFirstErrors(t *testing.T) {
	var tl Tally
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%4 == 0 {
				tl.Record(fmt.Errorf("request %d", i))
				return
			}
			tl.Record(nil)
		}()
	}
	wg.Wait()
	if ok, failed := tl.Counts(); ok != 30 || failed != 10 {
		t.Fatalf("counts %d ok, %d failed; want 30, 10", ok, failed)
	}
	tl.Record(errors.New("one more"))
	if errs := tl.Errors(); len(errs) != maxTallyErrors || !strings.Contains(errs[0], "request") {
		t.Fatalf("kept %d errors (%q); want the first %d", len(errs), errs, maxTallyErrors)
	}
}

func TestPostOK(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path == "/bad" {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	if err := PostOK(srv.Client(), srv.URL+"/", strings.NewReader("x")); err != nil {
		t.Fatalf("200: %v", err)
	}
	if err := PostOK(srv.Client(), srv.URL+"/bad", nil); err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("503: %v, want an error naming the status", err)
	}
}
