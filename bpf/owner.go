package bpf

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// The one-owner rule. A socket can be in the sockhash of one sk_msg owner only: a second
// owner's inserts fail with EBUSY, so two of them on the same sockets (another agent, Cilium's
// old sockops acceleration, Merbridge, an older meshturbo with another pin path) each
// accelerate a random part and silently miss the rest. At start New looks for sockops
// programs that run on the cgroup (attached to it or inherited from an ancestor) and use a
// sockmap or sockhash other than ours, and refuses with an *OwnerConflictError naming them.
// With Config.CoexistWithOtherOwners it runs anyway: sockets the other owner holds stay its
// own (counted in Stats.InsertBusy, the insert_failed{reason="busy"} metric, which is 0 when
// nobody else is there) and State.OtherOwners lists the owners, so the conflict can alert.

// OtherOwner is a sockops program of someone else that puts sockets into a sockmap.
type OtherOwner struct {
	ProgramID ebpf.ProgramID `json:"program_id"`
	Name      string         `json:"name"`
	SockMaps  []ebpf.MapID   `json:"sock_maps"`
}

func (o OtherOwner) String() string {
	return fmt.Sprintf("sockops program %d %q (sockmaps %v)", o.ProgramID, o.Name, o.SockMaps)
}

// OwnerConflictError is New's refusal to share the cgroup's sockets with another owner.
type OwnerConflictError struct {
	Cgroup string
	Owners []OtherOwner
}

func (e *OwnerConflictError) Error() string {
	names := make([]string, len(e.Owners))
	for i, o := range e.Owners {
		names[i] = o.String()
	}
	return fmt.Sprintf("bpf: another sockmap owner runs on cgroup %s: %s; each socket can be accelerated by one owner only, "+
		"so remove it (another meshturbo agent: 'meshturbo-agent uninstall -pin-path <its pin path>'; Cilium: sockops acceleration off; "+
		"Merbridge: uninstall), or set CoexistWithOtherOwners to run beside it and leave it the sockets it holds",
		e.Cgroup, strings.Join(names, ", "))
}

// otherOwners lists sockops programs effective on the cgroup that use a sockmap or sockhash
// other than the one pinned under pinPath (ours, left by an earlier agent: no conflict).
func otherOwners(cgroup, pinPath string) ([]OtherOwner, error) {
	var ours ebpf.MapID
	if m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, sockopsMapMtSockhash), nil); err == nil {
		if info, err := m.Info(); err == nil {
			ours, _ = info.ID()
		}
		m.Close()
	}
	f, err := os.Open(cgroup)
	if err != nil {
		return nil, fmt.Errorf("bpf: owner check: %w", err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{
		Target: int(f.Fd()), Attach: ebpf.AttachCGroupSockOps, QueryFlags: unix.BPF_F_QUERY_EFFECTIVE,
	})
	if err != nil {
		return nil, fmt.Errorf("bpf: owner check: query sockops programs on %s: %w", cgroup, err)
	}
	var out []OtherOwner
	for _, p := range res.Programs {
		prog, err := ebpf.NewProgramFromID(p.ID)
		if err != nil {
			continue // gone meanwhile
		}
		info, err := prog.Info()
		prog.Close()
		if err != nil {
			continue
		}
		ids, _ := info.MapIDs()
		o := OtherOwner{ProgramID: p.ID, Name: info.Name}
		for _, id := range ids {
			if id == ours {
				continue
			}
			m, err := ebpf.NewMapFromID(id)
			if err != nil {
				continue
			}
			mi, err := m.Info()
			m.Close()
			if err == nil && (mi.Type == ebpf.SockHash || mi.Type == ebpf.SockMap) {
				o.SockMaps = append(o.SockMaps, id)
			}
		}
		if len(o.SockMaps) > 0 {
			slices.Sort(o.SockMaps)
			out = append(out, o)
		}
	}
	return out, nil
}
