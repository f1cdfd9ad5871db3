package bpf

import (
	"fmt"
	"hash/fnv"
	"io"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// layoutHash hashes the name, type, sizes and key/value BTF layout (member names, offsets
// and types) of every map in spec except mt_meta's content. MapSpec.Compatible compares
// sizes only; this catches a struct whose fields moved at the same size. Never 0.
func layoutHash(spec *ebpf.CollectionSpec) uint64 {
	names := make([]string, 0, len(spec.Maps))
	for name, ms := range spec.Maps {
		// Only the pinned maps outlive the agent; .rodata and the like are made anew.
		if ms.Pinning == ebpf.PinByName {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	h := fnv.New64a()
	for _, name := range names {
		ms := spec.Maps[name]
		fmt.Fprintf(h, "%s type=%s key=%d value=%d flags=%d\n", name, ms.Type, ms.KeySize, ms.ValueSize, ms.Flags)
		writeBTF(h, ms.Key, 0)
		io.WriteString(h, "\n")
		writeBTF(h, ms.Value, 0)
		io.WriteString(h, "\n")
	}
	if sum := h.Sum64(); sum != 0 {
		return sum
	}
	return 1
}

func writeBTF(w io.Writer, t btf.Type, depth int) {
	if t == nil || depth > 8 {
		io.WriteString(w, "?")
		return
	}
	switch t := t.(type) {
	case *btf.Struct:
		writeMembers(w, "struct "+t.Name, t.Size, t.Members, depth)
	case *btf.Union:
		writeMembers(w, "union "+t.Name, t.Size, t.Members, depth)
	case *btf.Int:
		fmt.Fprintf(w, "int %s %d %d", t.Name, t.Size, t.Encoding)
	case *btf.Array:
		fmt.Fprintf(w, "[%d]", t.Nelems)
		writeBTF(w, t.Type, depth+1)
	case *btf.Typedef:
		writeBTF(w, t.Type, depth+1)
	case *btf.Volatile:
		writeBTF(w, t.Type, depth+1)
	case *btf.Const:
		writeBTF(w, t.Type, depth+1)
	case *btf.Enum:
		fmt.Fprintf(w, "enum %s %d", t.Name, t.Size)
	case *btf.Pointer:
		io.WriteString(w, "*")
	default:
		fmt.Fprintf(w, "%T", t)
	}
}

func writeMembers(w io.Writer, name string, size uint32, members []btf.Member, depth int) {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %d {", name, size)
	io.WriteString(w, b.String())
	for _, m := range members {
		fmt.Fprintf(w, "%s@%d:%d ", m.Name, m.Offset, m.BitfieldSize)
		writeBTF(w, m.Type, depth+1)
		io.WriteString(w, "; ")
	}
	io.WriteString(w, "}")
}
