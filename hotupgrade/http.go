package hotupgrade

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"

	adminapi "github.com/meshturbo/meshturbo/internal/admin"
)

// UpgradeBody is the JSON body of POST /v1/upgrade. Empty fields keep what runs now.
type UpgradeBody struct {
	Binary        string `json:"binary,omitempty"`
	BootstrapPath string `json:"bootstrap_path,omitempty"`
	// Handoff overrides the manager's hand-off mode for this upgrade: "auto", "hotrestart"
	// or "reuseport".
	Handoff string `json:"handoff,omitempty"`
}

// UpgradeHandler serves POST /v1/upgrade: it runs an upgrade to the binary and bootstrap
// file named in the body and answers with the UpgradeResult when it is over. Status codes:
// 200 upgraded, 409 another upgrade is running (nothing done), 422 precheck failed (nothing
// started), 500 rolled back (the old Envoy serves on), 400 a bad request.
func (m *Manager) UpgradeHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body UpgradeBody
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&body); err != nil && !errors.Is(err, io.EOF) {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body: " + err.Error()})
			return
		}
		var req UpgradeRequest
		req.Binary, req.Handoff = body.Binary, body.Handoff
		if body.BootstrapPath != "" {
			b, err := os.ReadFile(body.BootstrapPath)
			if err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("bootstrap: %v", err)})
				return
			}
			req.Bootstrap = b
		}
		// The upgrade runs to its end even if the caller hangs up; Close still cancels it.
		res, err := m.TryUpgrade(context.WithoutCancel(r.Context()), req)
		switch {
		case errors.Is(err, ErrUpgradeInProgress), errors.Is(err, ErrClosed):
			writeJSON(w, http.StatusConflict, map[string]string{"error": err.Error()})
		case err == nil:
			writeJSON(w, http.StatusOK, res)
		case res.Outcome == OutcomeRejected:
			writeJSON(w, http.StatusUnprocessableEntity, res)
		default:
			writeJSON(w, http.StatusInternalServerError, res)
		}
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) { _ = adminapi.WriteJSON(w, code, v) }
