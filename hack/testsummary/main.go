// Command testsummary reads `go test -json` output on stdin, prints it as `go test -v` would,
// and ends with one line that counts the tests:
//
//	test: 12 passed, 0 failed, 3 skipped
//
// A package that fails without a failing test (a build error, a panic in TestMain) counts as
// one failure. Lines that are not JSON are printed as they are. It exits 1 if anything failed.
//
// Usage: go test -json ./... 2>&1 | go run ./hack/testsummary
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
)

// event is the part of a test2json event that we use.
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

type summary struct {
	passed, failed, skipped int
	failures                []string
	pkgHasFailedTest        map[string]bool
}

func main() {
	s, err := run(os.Stdin, os.Stdout)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testsummary: %v\n", err)
		os.Exit(2)
	}
	if s.failed > 0 {
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) (*summary, error) {
	s := &summary{pkgHasFailedTest: map[string]bool{}}
	w := bufio.NewWriter(out)
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var ev event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &ev) != nil {
			w.Write(line)
			w.WriteByte('\n')
			w.Flush()
			continue
		}
		if ev.Output != "" {
			w.WriteString(ev.Output)
			w.Flush()
		}
		s.add(ev)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	sort.Strings(s.failures)
	for _, f := range s.failures {
		fmt.Fprintf(w, "test: FAIL %s\n", f)
	}
	fmt.Fprintf(w, "test: %d passed, %d failed, %d skipped\n", s.passed, s.failed, s.skipped)
	return s, w.Flush()
}

func (s *summary) add(ev event) {
	switch {
	case ev.Test != "":
		switch ev.Action {
		case "pass":
			s.passed++
		case "skip":
			s.skipped++
		case "fail":
			s.failed++
			s.failures = append(s.failures, ev.Package+" "+ev.Test)
			s.pkgHasFailedTest[ev.Package] = true
		}
	case ev.Action == "fail" && !s.pkgHasFailedTest[ev.Package]:
		// The package failed, but no test in it did: a build failure, a panic outside a
		// test, a TestMain that failed.
		s.failed++
		s.failures = append(s.failures, ev.Package+" (package: no test failed; see its output)")
	}
}
