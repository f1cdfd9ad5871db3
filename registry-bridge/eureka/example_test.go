package eureka_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/meshturbo/meshturbo/model"
	bridge "github.com/meshturbo/meshturbo/registry-bridge"
	"github.com/meshturbo/meshturbo/registry-bridge/eureka"
)

var _ bridge.Watcher = (*eureka.Watcher)(nil)

// A watcher is one of the bridge's sources (cmd/ wires it into bridge.Config.Watchers). Run
// publishes the whole set of services every time it changes.
func Example() {
	w, err := eureka.New(eureka.Config{
		URLs:   []string{"http://eureka-1:8761/eureka", "http://eureka-2:8761/eureka"},
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil)),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // a real caller runs until shutdown
	err = w.Run(ctx, func(svcs []model.Service) {
		// e.g. orders.eureka, one endpoint per UP instance of ORDERS
	})
	fmt.Println(err)
}
