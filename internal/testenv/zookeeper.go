package testenv

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// ZooKeeperTickTime is the tick of the test ZooKeeper. Sessions last between 2 and 20 ticks
// (1 s to 10 s), whatever the client asks for, so expiry tests need not wait long.
const ZooKeeperTickTime = 500 * time.Millisecond

// ZooKeeper is a standalone ZooKeeper server.
type ZooKeeper struct {
	*Process
	Addr    string // "127.0.0.1:port" of the client port
	DataDir string // kept across Restart, so sessions and znodes survive it
}

// StartZooKeeper runs a standalone QuorumPeerMain with its own zoo.cfg (data in a temporary
// directory, client port on 127.0.0.1, no admin server, all four-letter words allowed) and
// returns once it answers "ruok" with "imok" and "srvr" with its mode (it serves requests).
func StartZooKeeper(t testing.TB) *ZooKeeper {
	t.Helper()
	z, err := StartZooKeeperIn(testEnv(t), RequireDeps(t))
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return z
}

// StartZooKeeperIn is StartZooKeeper outside a test.
func StartZooKeeperIn(env *Env, d Deps) (*ZooKeeper, error) {
	return StartZooKeeperWith(env, d, ZooKeeperOptions{})
}

// ZooKeeperOptions are the rare knobs of a test ZooKeeper.
type ZooKeeperOptions struct {
	// MaxHeap is the JVM's -Xmx (default "256m"); a benchmark holding 100,000 znodes needs more.
	MaxHeap string
}

// StartZooKeeperWith is StartZooKeeperIn with options.
func StartZooKeeperWith(env *Env, d Deps, o ZooKeeperOptions) (*ZooKeeper, error) {
	if o.MaxHeap == "" {
		o.MaxHeap = "256m"
	}
	dir, err := env.workDir("zookeeper")
	if err != nil {
		return nil, fmt.Errorf("start zookeeper: %w", err)
	}
	dataDir := filepath.Join(dir, "data")
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return nil, fmt.Errorf("start zookeeper: %w", err)
	}
	ports, err := FreeLoopbackPorts(1)
	if err != nil {
		return nil, err
	}
	addr := Addr(ports[0])
	cfg := fmt.Sprintf(`tickTime=%d
dataDir=%s
clientPort=%d
clientPortAddress=127.0.0.1
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=*
`, ZooKeeperTickTime.Milliseconds(), dataDir, ports[0])
	cfgPath := filepath.Join(dir, "zoo.cfg")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, fmt.Errorf("start zookeeper: %w", err)
	}
	cmd := exec.Command(d.Java, append(javaTestFlags(dir, o.MaxHeap),
		"-cp", d.ZooKeeperClasspath,
		"org.apache.zookeeper.server.quorum.QuorumPeerMain", cfgPath)...)
	cmd.Dir = dir
	p, err := StartIn(env, "zookeeper", cmd, zooKeeperProbe(addr), time.Minute)
	if err != nil {
		return nil, err
	}
	return &ZooKeeper{Process: p, Addr: addr, DataDir: dataDir}, nil
}

// zooKeeperProbe succeeds once the server is up ("ruok" answers "imok") and serving: "imok"
// comes a moment before the server accepts sessions, while "srvr" still answers "This
// ZooKeeper instance is not currently serving requests".
func zooKeeperProbe(addr string) func(context.Context) error {
	return func(ctx context.Context) error {
		reply, err := FourLetterWord(ctx, addr, "ruok")
		if err != nil {
			return err
		}
		if reply != "imok" {
			return fmt.Errorf("ruok: got %q, want imok", reply)
		}
		srvr, err := FourLetterWord(ctx, addr, "srvr")
		if err != nil {
			return err
		}
		if !strings.Contains(srvr, "Mode: ") {
			return fmt.Errorf("srvr: %q", srvr)
		}
		return nil
	}
}

// FourLetterWord sends a ZooKeeper four-letter command (ruok, srvr, mntr, cons, ...) to addr
// and returns the reply.
func FourLetterWord(ctx context.Context, addr, word string) (string, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	if _, err := io.WriteString(conn, word); err != nil {
		return "", fmt.Errorf("zookeeper %s %s: %w", addr, word, err)
	}
	reply, err := io.ReadAll(conn) // the server closes the connection after replying
	if err != nil {
		return "", fmt.Errorf("zookeeper %s %s: %w", addr, word, err)
	}
	return strings.TrimSpace(string(reply)), nil
}

// javaTestFlags are JVM flags for a quick-starting, small test server whose temporary files
// stay in dir.
func javaTestFlags(dir, maxHeap string) []string {
	return []string{
		"-Xmx" + maxHeap,
		"-XX:+UseSerialGC",
		"-XX:TieredStopAtLevel=1",
		"-Djava.io.tmpdir=" + dir,
		"-Djava.net.preferIPv4Stack=true",
	}
}
