package main

import (
	"strings"
	"testing"
)

func TestRun(t *testing.T) {
	in := strings.Join([]string{
		`{"Action":"start","Package":"a"}`,
		`{"Action":"run","Package":"a","Test":"TestOK"}`,
		`{"Action":"output","Package":"a","Test":"TestOK","Output":"--- PASS: TestOK (0.00s)\n"}`,
		`{"Action":"pass","Package":"a","Test":"TestOK"}`,
		`{"Action":"skip","Package":"a","Test":"TestSkip"}`,
		`{"Action":"fail","Package":"a","Test":"TestBad"}`,
		`{"Action":"fail","Package":"a"}`,
		`# b`,
		`{"Action":"output","Package":"b","Output":"FAIL\tb [build failed]\n"}`,
		`{"Action":"fail","Package":"b"}`,
		`{"Action":"pass","Package":"c"}`,
	}, "\n")
	var out strings.Builder
	s, err := run(strings.NewReader(in), &out)
	if err != nil {
		t.Fatal(err)
	}
	if s.passed != 1 || s.failed != 2 || s.skipped != 1 {
		t.Errorf("counted %d passed, %d failed, %d skipped; want 1, 2, 1", s.passed, s.failed, s.skipped)
	}
	got := out.String()
	for _, want := range []string{
		"--- PASS: TestOK (0.00s)\n",
		"# b\n",
		"FAIL\tb [build failed]\n",
		"test: FAIL a TestBad\n",
		"test: FAIL b (package: no test failed; see its output)\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if !strings.HasSuffix(got, "\ntest: 1 passed, 2 failed, 1 skipped\n") {
		t.Errorf("output does not end with the summary line:\n%s", got)
	}
}
