#!/usr/bin/env bash
# bench/run.sh [--quick] [--out FILE] [--keep] [--rev COMMIT]
#
# mxq's benchmark in one command: mxq, an SMTP server that stores nothing
# (nullsmtp, the ceiling) and a private Postfix instance (fsync as shipped,
# delivery deferred) side by side on this machine, loaded by the same client
# (smtpload) with the same messages. It prints a Markdown report and writes
# it to bench/results/latest.md (--quick: bench/results/quick.md).
#
# The machine is shared and noisy, so every measurement is taken in rounds
# that interleave the servers (nullsmtp, mxq, postfix, nullsmtp, ...) and
# the report shows medians and ratios, never a single run.
#
#   --quick  one round of small loads (a smoke test, about a minute)
#   --out    where to write the report
#   --keep   keep the work directory (logs, configs, raw results)
#   --rev R  build mxq from commit R (git archive) instead of the working
#            tree, e.g. to measure HEAD while the tree has edits in flight
#
# Needs root or sudo: Postfix's master runs as root, strace attaches to
# other processes, and missing Debian packages are installed.
set -eEuo pipefail
trap 'log "failed: line $LINENO: $BASH_COMMAND"' ERR
export PATH=$PATH:/usr/sbin:/sbin
cd "$(dirname "$0")/.."
REPO=$PWD

QUICK=0 KEEP=0 OUT="" REV=""
while (($#)); do
	case $1 in
	--quick) QUICK=1 ;;
	--keep) KEEP=1 ;;
	--out) OUT=$2; shift ;;
	--rev) REV=$2; shift ;;
	*) echo "usage: bench/run.sh [--quick] [--out FILE] [--keep] [--rev COMMIT]" >&2; exit 2 ;;
	esac
	shift
done

# The loads. Counts are the same for every server of a cell (same client,
# same messages); they are sized so that the fastest server runs for about
# a second or more and Postfix for ten or so in the full run.
# CELLS: "size sessions messages messages-per-connection"
if ((QUICK)); then
	ROUNDS=1
	CELLS=("10240 1 100 1" "10240 32 400 1" "10240 128 400 1" "10240 32 400 100"
		"102400 1 50 1" "102400 32 200 1" "102400 128 200 1")
	SRC_CELLS=("10240 32 400")
	FSYNC_MSGS=300 # at 32 sessions; a fifth of it at 1 session
	BACKLOG=2000
	MEMORY=10000
	OUT=${OUT:-$REPO/bench/results/quick.md}
else
	ROUNDS=5
	CELLS=("10240 1 1000 1" "10240 32 6000 1" "10240 128 6000 1" "10240 32 6000 100"
		"102400 1 500 1" "102400 32 2000 1" "102400 128 2000 1")
	SRC_CELLS=("10240 32 5000" "10240 128 8000" "102400 32 2000")
	FSYNC_MSGS=3000
	BACKLOG=20000
	MEMORY=100000
	OUT=${OUT:-$REPO/bench/results/latest.md}
fi
SERVERS=(nullsmtp mxq postfix)

SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO=sudo

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# --- what it needs ---------------------------------------------------------

install_missing() {
	local pkgs=()
	command -v postfix >/dev/null || pkgs+=(postfix)
	command -v strace >/dev/null || pkgs+=(strace)
	command -v jq >/dev/null || pkgs+=(jq)
	command -v curl >/dev/null || pkgs+=(curl)
	((${#pkgs[@]})) || return 0
	log "installing ${pkgs[*]}"
	# "No configuration": the package must not set up (or start) the
	# system's own Postfix; this script runs a private instance.
	echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
	$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
	$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}
install_missing
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

WORK=$(mktemp -d /tmp/mxq-bench.XXXXXX)
chmod 755 "$WORK" # Postfix's unprivileged daemons live below it
BIN=$WORK/bin
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
MXQ_PID="" NULL_PID="" SINK_PID="" STRACE_PID="" PF_STARTED=0

cleanup() {
	local rc=$?
	set +e
	trap - ERR
	[[ -n $STRACE_PID ]] && kill -INT "$STRACE_PID" 2>/dev/null && wait "$STRACE_PID"
	((PF_STARTED)) && postfix_stop
	local p
	for p in $MXQ_PID $NULL_PID $SINK_PID; do
		kill -TERM "$p" 2>/dev/null && wait "$p"
	done
	declare -F mxq_unstage >/dev/null && mxq_unstage
	if ((rc != 0)); then
		log "failed (exit $rc); last lines of the logs:"
		$SUDO tail -n 5 "$WORK"/*.log "$WORK"/postfix/maillog >&2 2>/dev/null
	fi
	if ((KEEP)); then
		log "work directory kept: $WORK"
	else
		$SUDO rm -rf "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SRC=$REPO
if [[ -n $REV ]]; then
	# The commit's tree, with this bench/ folder over it.
	SRC=$WORK/src
	mkdir -p "$SRC"
	git -C "$REPO" archive "$REV" | tar -x -C "$SRC"
	cp -r "$REPO/bench/." "$SRC/bench/"
	MXQ_VERSION=$(git -C "$REPO" rev-parse --short "$REV")
else
	MXQ_VERSION=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)
fi
log "building mxq $MXQ_VERSION into $BIN"
mkdir -p "$BIN"
(
	cd "$SRC"
	go build -o "$BIN/mxq" ./cmd/mxq
	go build -o "$BIN/nullsmtp" ./bench/nullsmtp
	go build -o "$BIN/smtpload" ./bench/smtpload
	go build -o "$BIN/sink" ./bench/sink
)
# The build left ~100 MiB of dirty pages; written back during the first
# cells, they would slow whichever server fsyncs then.
sync

# --- ports and processes ---------------------------------------------------

TAKEN=" "
# free_port VAR: a loopback port nobody listens on, below the ephemeral
# range so that no client connection can be holding it.
free_port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 12000))
		[[ $TAKEN == *" $p "* ]] && continue
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			TAKEN+="$p "
			printf -v "$1" %d "$p"
			return
		fi
	done
}
free_port P_NULL
free_port P_MXQ
free_port P_DEAD # mxq's backend while it only accepts: nobody listens
free_port P_POSTFIX
free_port P_SINK_LMTP
free_port P_SINK_SMTP
free_port P_SINK_HTTP
declare -A ADDR=([nullsmtp]=127.0.0.1:$P_NULL [mxq]=127.0.0.1:$P_MXQ [postfix]=127.0.0.1:$P_POSTFIX)

# wait_port PORT [PID]: until something accepts on PORT (and PID lives).
wait_port() {
	local i
	for ((i = 0; i < 600; i++)); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		[[ -z ${2:-} ]] || kill -0 "$2" 2>/dev/null || die "process $2 died before listening on $1"
		sleep 0.1
	done
	die "nothing listens on port $1 after 60 s"
}

"$BIN/nullsmtp" -listen "${ADDR[nullsmtp]}" >"$WORK/nullsmtp.log" 2>&1 &
NULL_PID=$!
wait_port "$P_NULL" "$NULL_PID"

# mxq_start DATA_DIR BACKEND_YAML: mxq on its port with the given backend
# configuration; everything else is the default (durability: group).
mxq_start() {
	cat >"$WORK/mxq.yaml" <<-EOF
		node_name: bench
		data_dir: $1
		log: {level: warn}
		smtp:
		  listen: ${ADDR[mxq]}
		  domains: [example.test]
		admin: {listen: ""}
		$2
	EOF
	"$BIN/mxq" serve --config "$WORK/mxq.yaml" >>"$WORK/mxq.log" 2>&1 &
	MXQ_PID=$!
	wait_port "$P_MXQ" "$MXQ_PID"
}
# mxq_alive: fail clearly if mxq is gone (this machine is shared: a
# crash, or someone's kill, must not look like a stalled benchmark).
mxq_alive() {
	kill -0 "$MXQ_PID" 2>/dev/null && return 0
	local rc=0
	wait "$MXQ_PID" || rc=$?
	MXQ_PID=""
	die "mxq died (exit status $rc$( ((rc > 128)) && echo ": signal $((rc - 128))")); see mxq.log"
}
mxq_stop() {
	kill -TERM "$MXQ_PID"
	wait "$MXQ_PID" || die "mxq exited with an error, see mxq.log"
	MXQ_PID=""
}
# mxq_unstage: remove the tmpfs directory where mxq stages atomic batches
# (queue.batch_staging: auto). It is named after the data directory and
# kept after a stop, for a restart's recovery; these data directories are
# thrown away, so their staging directories go too.
mxq_unstage() {
	local link
	link=$(readlink "$WORK/mxq-data/jetstream/\$G/streams/MXQ/batches" 2>/dev/null) || return 0
	[[ $link != /dev/shm/mxq-staging-* ]] || rm -rf "$link"
}
# mxq_fresh: mxq with an empty queue whose backend is down, so it only
# accepts (the drain sees the backend unreachable and waits).
mxq_fresh() {
	[[ -z $MXQ_PID ]] || mxq_stop
	mxq_unstage
	rm -rf "$WORK/mxq-data"
	mxq_start "$WORK/mxq-data" "backend: lmtp://127.0.0.1:$P_DEAD"
}

# --- the private Postfix instance ------------------------------------------

PF=$WORK/postfix
PFC=$PF/etc
postfix_setup() {
	mkdir -p "$PFC" "$PF/queue" "$PF/data"
	# Only what a relay for one domain needs, the rest as shipped
	# (including fsync of every queue file before the 250). Delivery is
	# deferred: the smtp transport waits for a flush, and the backoff is
	# long so that no queue run competes with the measurements. The
	# transport already points at the sink for the drain phase.
	cat >"$PFC/main.cf" <<-EOF
		compatibility_level = 3.6
		queue_directory = $PF/queue
		data_directory = $PF/data
		mail_owner = postfix
		setgid_group = postdrop
		syslog_name = postfix-mxq-bench
		maillog_file = $PF/maillog
		maillog_file_prefixes = $PF
		myhostname = postfix.bench.test
		mydomain = bench.test
		mydestination =
		local_recipient_maps =
		alias_maps =
		alias_database =
		inet_interfaces = 127.0.0.1
		inet_protocols = ipv4
		mynetworks = 127.0.0.0/8
		relay_domains = example.test
		transport_maps = inline:{example.test=smtp:[127.0.0.1]:$P_SINK_SMTP}
		defer_transports = smtp
		queue_run_delay = 1h
		minimal_backoff_time = 1h
		maximal_backoff_time = 2h
	EOF
	# Debian's master.cf without the pipe services, not chrooted (a chroot
	# would need a copy of /etc files in the queue directory), and with
	# smtpd on a loopback port instead of *:25.
	cat >"$PFC/master.cf" <<-EOF
		127.0.0.1:$P_POSTFIX inet n - n - - smtpd
		pickup    unix  n - n 60    1 pickup
		cleanup   unix  n - n -     0 cleanup
		qmgr      unix  n - n 300   1 qmgr
		rewrite   unix  - - n -     - trivial-rewrite
		bounce    unix  - - n -     0 bounce
		defer     unix  - - n -     0 bounce
		trace     unix  - - n -     0 bounce
		verify    unix  - - n -     1 verify
		flush     unix  n - n 1000? 0 flush
		proxymap  unix  - - n -     - proxymap
		smtp      unix  - - n -     - smtp
		relay     unix  - - n -     - smtp
		showq     unix  n - n -     - showq
		error     unix  - - n -     - error
		retry     unix  - - n -     - error
		discard   unix  - - n -     - discard
		anvil     unix  - - n -     1 anvil
		scache    unix  - - n -     1 scache
		postlog   unix-dgram n - n - 1 postlogd
	EOF
	$SUDO chown -R root: "$PFC" "$PF/queue"
	$SUDO chown postfix: "$PF/data"
	$SUDO chmod 700 "$PF/data"
	$SUDO postfix -c "$PFC" check
	$SUDO postfix -c "$PFC" start >/dev/null 2>&1 || die "Postfix did not start: $($SUDO tail -n 3 "$PF/maillog")"
	PF_STARTED=1
	wait_port "$P_POSTFIX"
}
postfix_master() { $SUDO awk '{print $1}' "$PF/queue/pid/master.pid"; }
postfix_stop() {
	local pid i
	pid=$(postfix_master)
	$SUDO postfix -c "$PFC" stop >/dev/null 2>&1
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	PF_STARTED=0
}
# postfix_count DIR...: messages in those queues.
postfix_count() {
	local d dirs=()
	for d; do dirs+=("$PF/queue/$d"); done
	$SUDO find "${dirs[@]}" -type f | wc -l
}
# postfix_settle: wait until every message accepted has been moved to the
# deferred queue, so that Postfix's own after-work does not run during the
# next server's measurement.
postfix_settle() {
	local i
	for ((i = 0; i < 1200; i++)); do
		(($(postfix_count incoming active maildrop) == 0)) && return 0
		sleep 0.1
	done
	log "warning: Postfix still has messages in incoming/active after 120 s"
}
postfix_purge() {
	$SUDO postsuper -c "$PFC" -d ALL >/dev/null 2>&1
	postfix_settle
}

postfix_setup
PF_MASTER=$(postfix_master)
log "servers: nullsmtp ${ADDR[nullsmtp]}, mxq ${ADDR[mxq]}, postfix ${ADDR[postfix]} ($(postconf -d -h mail_version))"

# --- measuring ---------------------------------------------------------------

# cpu_ms SERVER: the CPU time (user and system, in ms) the server's
# processes have used so far. For Postfix that is the master, its children
# alive now, and those it has reaped (the master's cutime and cstime).
cpu_ms() {
	local pids
	case $1 in
	nullsmtp) pids=$NULL_PID ;;
	mxq) pids=$MXQ_PID ;;
	postfix) pids="$PF_MASTER $(pgrep -P "$PF_MASTER" | tr '\n' ' ' || true)" ;;
	esac
	local p
	# A Postfix child may exit between pgrep and cat: its time is then in
	# the master's cutime, or lost if not yet reaped (a few ms).
	for p in $pids; do
		cat "/proc/$p/stat" 2>/dev/null || true
	done | awk -v hz="$(getconf CLK_TCK)" '
		# Fields after "pid (comm) ": utime, stime, cutime, cstime are 12-15.
		{ sub(/^.*\) /, ""); split($0, f, " "); t += f[12] + f[13] + f[14] + f[15] }
		END { printf "%d\n", t * 1000 / hz }'
}

# load PHASE SERVER ROUND SESSIONS MESSAGES SIZE [PER_CONN]: one smtpload
# run, appended to the results with its labels and the server's CPU time
# (for Postfix including the move to the deferred queue); its JSON is left
# in LAST.
LAST=""
load() {
	local phase=$1 server=$2 round=$3 sessions=$4 messages=$5 size=$6 perconn=${7:-1} cpu0
	[[ $server != mxq ]] || mxq_alive
	cpu0=$(cpu_ms "$server")
	LAST=$("$BIN/smtpload" -addr "${ADDR[$server]}" -s "$sessions" -m "$messages" -size "$size" -per-conn "$perconn")
	[[ $server != postfix ]] || postfix_settle
	[[ $server != mxq ]] || mxq_alive
	LAST=$(jq -c --arg phase "$phase" --arg server "$server" --argjson round "$round" --argjson cpu "$(($(cpu_ms "$server") - cpu0))" \
		'. + {phase: $phase, server: $server, round: $round, server_cpu_ms: $cpu}' <<<"$LAST")
	echo "$LAST" >>"$RESULTS"
	log "$(jq -r '"\(.phase) \(.server): \(.sessions) sessions, \(.size) B, \(.per_conn)/conn: \(.msgs_per_s|round) msg/s, p50 \(.p50_ms) ms, 2xx \(.ok_2xx)/\(.messages), 4xx \(.temp_4xx), 5xx \(.perm_5xx), errors \(.errors) \(.first_error // "")"' <<<"$LAST")"
}
# note JSON: a free-form result row.
note() { jq -c -n "$1" >>"$RESULTS"; }

# Acceptance: per cell, a fresh queue in mxq and Postfix, a warm-up of each
# server (Postfix forks its smtpd processes, Go grows its heaps), then the
# rounds.
for cell in "${CELLS[@]}"; do
	read -r size sessions messages perconn <<<"$cell"
	log "cell: $size B, $sessions sessions, $messages messages, $perconn per connection"
	mxq_fresh
	postfix_purge
	for server in "${SERVERS[@]}"; do
		load warmup "$server" 0 "$sessions" $((messages / 10 > 20 ? messages / 10 : 20)) "$size" "$perconn"
	done
	for ((round = 1; round <= ROUNDS; round++)); do
		for server in "${SERVERS[@]}"; do
			load accept "$server" "$round" "$sessions" "$messages" "$size" "$perconn"
		done
	done
done

# The same with smtp-source, the load client from Postfix's package that
# the accept-speed goal was first measured with: one C process for all the
# sessions, lighter than smtpload, so it leaves the servers more of the
# two cores. It stops at the first reply that is not 2xx (exit status 1),
# so a run that exits 0 had every message accepted.
source_load() { # source_load SERVER ROUND SESSIONS MESSAGES SIZE
	local server=$1 round=$2 sessions=$3 messages=$4 size=$5 cpu0 t0 t1 rc=0
	[[ $server != mxq ]] || mxq_alive
	cpu0=$(cpu_ms "$server")
	t0=$(date +%s.%N)
	smtp-source -s "$sessions" -m "$messages" -l "$size" -f load@example.org -t user@example.test \
		"${ADDR[$server]}" 2>"$WORK/smtp-source.err" || rc=$?
	t1=$(date +%s.%N)
	[[ $server != postfix ]] || postfix_settle
	[[ $server != mxq ]] || mxq_alive
	((rc == 0)) || log "smtp-source against $server failed: $(head -c 300 "$WORK/smtp-source.err")"
	note "{phase: \"source\", server: \"$server\", round: $round, sessions: $sessions, messages: $messages, size: $size,
		seconds: ($t1 - $t0), msgs_per_s: ($messages / ($t1 - $t0)), ok_2xx: (if $rc == 0 then $messages else 0 end),
		temp_4xx: 0, perm_5xx: 0, errors: (if $rc == 0 then 0 else 1 end), server_cpu_ms: $(($(cpu_ms "$server") - cpu0))}"
	log "$(jq -r 'select(.phase == "source") | "source \(.server): \(.sessions) sessions, \(.size) B: \(.msgs_per_s|round) msg/s"' <(tail -n 1 "$RESULTS"))"
}
for cell in "${SRC_CELLS[@]}"; do
	read -r size sessions messages <<<"$cell"
	log "smtp-source cell: $size B, $sessions sessions, $messages messages"
	mxq_fresh
	postfix_purge
	for server in "${SERVERS[@]}"; do
		source_load "$server" 0 "$sessions" $((messages / 10)) "$size"
	done
	for ((round = 1; round <= ROUNDS; round++)); do
		for server in "${SERVERS[@]}"; do
			source_load "$server" "$round" "$sessions" "$messages" "$size"
		done
	done
done

# fsyncs per accepted message: strace counts fsync and fdatasync calls in
# the server's processes while it takes a fixed load. For Postfix that is
# the master and every child (those forked later are followed with -f), and
# the count runs until Postfix has moved the messages to the deferred queue.
# strace slows the server, so these runs give no rates.
count_fsyncs() { # count_fsyncs SERVER SESSIONS MESSAGES PID...
	local server=$1 sessions=$2 messages=$3 out=$WORK/strace-$1-$2.txt args=() p i
	shift 3
	for p; do args+=(-p "$p"); done
	$SUDO strace -f -c -e trace=fsync,fdatasync -o "$out" "${args[@]}" 2>/dev/null &
	STRACE_PID=$!
	for ((i = 0; i < 100; i++)); do
		[[ $(awk '/^TracerPid/{print $2}' "/proc/$1/status") != 0 ]] && break
		sleep 0.1
	done
	sleep 0.5 # the other pids and threads
	load fsync "$server" 0 "$sessions" "$messages" 10240
	kill -INT "$STRACE_PID"
	wait "$STRACE_PID" || true
	STRACE_PID=""
	local calls
	calls=$($SUDO awk '$NF == "fsync" || $NF == "fdatasync" { n += $4 } END { print n + 0 }' "$out")
	note "{phase: \"fsyncs\", server: \"$server\", sessions: $sessions, accepted: $(jq .ok_2xx <<<"$LAST"), fsyncs: $calls}"
}
log "fsyncs per message"
for sessions in 1 32; do
	n=$((sessions == 1 ? FSYNC_MSGS / 5 : FSYNC_MSGS))
	mxq_fresh
	count_fsyncs mxq "$sessions" "$n" "$MXQ_PID"
	postfix_purge
	master=$(postfix_master)
	# shellcheck disable=SC2046 # one pid per word
	count_fsyncs postfix "$sessions" "$n" "$master" $(pgrep -P "$master")
done

# Drain: a backlog of BACKLOG messages in each, then the sink comes up and
# each is pointed at it; the time runs from the command that lets delivery
# start (mxq: starting the process on the full queue; Postfix: postqueue -f)
# to the arrival of the last message at the sink.
"$BIN/sink" -lmtp "127.0.0.1:$P_SINK_LMTP" -smtp "127.0.0.1:$P_SINK_SMTP" -http "127.0.0.1:$P_SINK_HTTP" >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
wait_port "$P_SINK_HTTP" "$SINK_PID"
sink_wait() { # sink_wait PROTO N T0 SERVER: waits, records a drain row
	local res i
	# In short waits, so that a dead mxq is noticed.
	for ((i = 0; i < 180; i++)); do
		res=$(curl -sf "http://127.0.0.1:$P_SINK_HTTP/wait?proto=$1&n=$2&timeout=5s")
		(($(jq .count <<<"$res") < $2)) || break
		[[ $4 != mxq ]] || mxq_alive
	done
	note "$res + {phase: \"drain\", server: \"$4\", messages: $2, t0: $3}"
	log "drain $4: $(jq -c . <<<"$res")"
}

log "drain: mxq, backlog of $BACKLOG"
mxq_fresh
load backlog mxq 0 32 "$BACKLOG" 10240
mxq_stop
t0=$(date +%s.%N)
# The backend keeps the name "store" (queued mail is filed under it), now
# at the sink, with limits far above what the machine can do.
mxq_start "$WORK/mxq-data" "backends:
  store:
    protocol: lmtp
    address: 127.0.0.1:$P_SINK_LMTP
    rate: 100000
    concurrency: 16"
sink_wait lmtp "$BACKLOG" "$t0" mxq

log "drain: postfix, backlog of $BACKLOG"
postfix_purge
load backlog postfix 0 32 "$BACKLOG" 10240
deferred=$(postfix_count deferred)
((deferred == BACKLOG)) || log "warning: Postfix has $deferred deferred messages, expected $BACKLOG"
$SUDO postconf -c "$PFC" -e "defer_transports ="
$SUDO postfix -c "$PFC" reload >/dev/null 2>&1
sleep 2 # the old qmgr must be gone, or it would defer the flush again
t0=$(date +%s.%N)
$SUDO postqueue -c "$PFC" -f
sink_wait smtp "$BACKLOG" "$t0" postfix

# Memory: mxq's resident set while its backlog grows (the drain blocked);
# the queue lives in the file store, so it must stay flat.
log "memory: mxq, backlog 0 to $MEMORY"
mxq_fresh
memory_row() { # memory_row BACKLOG
	local rss hwm disk
	mxq_alive
	rss=$(awk '/^VmRSS/{print $2}' "/proc/$MXQ_PID/status")
	hwm=$(awk '/^VmHWM/{print $2}' "/proc/$MXQ_PID/status")
	disk=$(du -sk "$WORK/mxq-data" | awk '{print $1}')
	note "{phase: \"memory\", backlog: $1, rss_kib: $rss, hwm_kib: $hwm, disk_kib: $disk}"
}
memory_row 0
for ((step = 1; step <= 10; step++)); do
	load grow mxq "$step" 32 $((MEMORY / 10)) 10240
	memory_row $((MEMORY * step / 10))
done
mxq_stop

# --- the report --------------------------------------------------------------

report() {
	local cpu disk
	cpu=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
	disk=$(df -T "$WORK" | awk 'NR == 2 {print $2 " on " $1}')
	echo "# mxq benchmark"
	echo
	if ((QUICK)); then
		echo "**Quick run** (one round, small loads): a smoke test, not a measurement."
		echo
	fi
	cat <<-EOF
		| machine | |
		|---|---|
		| date | $(date -u '+%Y-%m-%d %H:%M UTC') |
		| mxq | $MXQ_VERSION |
		| CPUs (nproc) | $(nproc) × $cpu |
		| kernel | $(uname -r) |
		| disk (df -T) | $disk |
		| Go | $(go env GOVERSION) |
		| Postfix | $(postconf -d -h mail_version) |
		| load average at start / end | $LOAD_START / $(cut -d' ' -f1-3 /proc/loadavg) |
		| duration | $((SECONDS / 60)) min $((SECONDS % 60)) s |

	EOF
	NPROC=$(nproc) jq -rs --argjson rounds "$ROUNDS" -f /dev/stdin "$RESULTS" <<-'JQ'
		def median: sort | if length == 0 then null
			elif length % 2 == 1 then .[(length - 1) / 2]
			else (.[length / 2 - 1] + .[length / 2]) / 2 end;
		def f($d): if . == null then "–" else
			(. * pow(10; $d) | round) as $x | ($x / pow(10; $d) | tostring) as $s
			| if $d == 0 or ($s | contains(".")) then $s else $s + "." end
			| . + ("0" * ($d - (split(".") | .[1] | length))) end;
		def kib: "\(. / 1024) KiB";
		def med($srv; f): map(select(.server == $srv) | f) | median;
		. as $all
		| [.[] | select(.phase == "accept")] as $acc
		| "## Acceptance rate\n",
		  "Messages accepted per second (`250` after the final dot), median of \($rounds) interleaved round(s); the same client and messages for every server. Ratios are of the medians.\n",
		  "| size | sessions | msgs/conn | nullsmtp msg/s | mxq msg/s | postfix msg/s | mxq/nullsmtp | mxq/postfix |",
		  "|---|---|---|---|---|---|---|---|",
		  ($acc | group_by([.size, .per_conn, .sessions])[]
			| med("nullsmtp"; .msgs_per_s) as $n | med("mxq"; .msgs_per_s) as $m | med("postfix"; .msgs_per_s) as $p
			| "| \(.[0].size | kib) | \(.[0].sessions) | \(.[0].per_conn) | \($n | f(0)) | \($m | f(0)) | \($p | f(0)) | \($m / $n | f(2)) | \($m / $p | f(1)) |"),
		  "",
		  "## Acceptance rate with smtp-source",
		  "",
		  "The same with `smtp-source` (Postfix's load client, one C process, lighter than smtpload) instead of smtpload, the servers interleaved the same way, one message per connection, median of \($rounds) round(s). Server CPU is per accepted message.\n",
		  "| size | sessions | nullsmtp msg/s | mxq msg/s | postfix msg/s | mxq/nullsmtp | mxq/postfix | server CPU ms/msg (nullsmtp / mxq / postfix) |",
		  "|---|---|---|---|---|---|---|---|",
		  ([$all[] | select(.phase == "source" and .round > 0)] | group_by([.size, .sessions])[]
			| med("nullsmtp"; .msgs_per_s) as $n | med("mxq"; .msgs_per_s) as $m | med("postfix"; .msgs_per_s) as $p
			| "| \(.[0].size | kib) | \(.[0].sessions) | \($n | f(0)) | \($m | f(0)) | \($p | f(0)) | \($m / $n | f(2)) | \($m / $p | f(1)) | \(med("nullsmtp"; .server_cpu_ms / .messages) | f(3)) / \(med("mxq"; .server_cpu_ms / .messages) | f(3)) / \(med("postfix"; .server_cpu_ms / .messages) | f(3)) |"),
		  "",
		  "## Latency",
		  "",
		  "Per transaction, from `MAIL FROM` to the reply after the final dot; 10 KiB, 32 sessions, one message per connection; median over the rounds of each run's percentile.\n",
		  "| server | p50 ms | p90 ms | p99 ms |",
		  "|---|---|---|---|",
		  ($acc | map(select(.size == 10240 and .sessions == 32 and .per_conn == 1)) as $l
			| ("nullsmtp", "mxq", "postfix") as $s
			| "| \($s) | \($l | med($s; .p50_ms) | f(2)) | \($l | med($s; .p90_ms) | f(2)) | \($l | med($s; .p99_ms) | f(2)) |"),
		  "",
		  "## CPU per accepted message",
		  "",
		  "CPU time (user + system) per accepted message, 10 KiB, 32 sessions, one message per connection, median over the rounds: the server's processes (Postfix: all of them, until the messages are deferred) and the load client beside it. With the client on the same machine, \(env.NPROC) cores can do at most \(env.NPROC) × 1000 / (server + client) messages per second: the CPU ceiling.\n",
		  "| server | server ms/msg | client ms/msg | CPU ceiling msg/s | measured msg/s |",
		  "|---|---|---|---|---|",
		  ($acc | map(select(.size == 10240 and .sessions == 32 and .per_conn == 1)) as $l
			| ("nullsmtp", "mxq", "postfix") as $s
			| ($l | med($s; .server_cpu_ms / .ok_2xx)) as $sv | ($l | med($s; .client_cpu_ms / .ok_2xx)) as $cl
			| "| \($s) | \($sv | f(3)) | \($cl | f(3)) | \((env.NPROC | tonumber) * 1000 / ($sv + $cl) | f(0)) | \($l | med($s; .msgs_per_s) | f(0)) |"),
		  "",
		  "## fsyncs per accepted message",
		  "",
		  "`strace -f -c -e trace=fsync,fdatasync` attached during a fixed load of 10 KiB messages (mxq: its process; Postfix: master and all children, until the messages are in the deferred queue). Postfix's cleanup fsyncs each queue file before the `250`; with delivery deferred, its bounce daemon also fsyncs the message's defer log. mxq's group commit shares one fsync among the messages that end at the same time; one session cannot share.\n",
		  "| server | sessions | accepted | fsync calls | per message |",
		  "|---|---|---|---|---|",
		  ($all[] | select(.phase == "fsyncs")
			| "| \(.server) | \(.sessions) | \(.accepted) | \(.fsyncs) | \(if .accepted > 0 then .fsyncs / .accepted | f(2) else "–" end) |"),
		  "",
		  "## Drain",
		  "",
		  "A backlog of 10 KiB messages in each server, then delivery to a sink that accepts everything (mxq over LMTP, rate ceiling 100 000/s, 16 connections; Postfix over SMTP, its defaults, `postqueue -f`). Time from the command that starts delivery to the last message at the sink.\n",
		  "| server | messages | delivered | distinct | first after s | all after s | msg/s |",
		  "|---|---|---|---|---|---|---|",
		  ([$all[] | select(.phase == "drain")] as $d
			| ($d[] | "| \(.server) | \(.messages) | \(.count) | \(.unique) | \(.first - .t0 | f(2)) | \(.last - .t0 | f(2)) | \(.messages / (.last - .t0) | f(0)) |"),
			"",
			($d | map({key: .server, value: (.messages / (.last - .t0))}) | from_entries
				| "Drain ratio mxq/postfix: **\(.mxq / .postfix | f(1))**")),
		  "",
		  "## mxq memory while the backlog grows",
		  "",
		  "VmRSS of the mxq process after each tenth of the backlog (10 KiB messages, 32 sessions, the drain blocked by an unreachable backend). The backlog lives in the file store, so memory must stay flat.\n",
		  "| backlog | VmRSS MiB | peak VmHWM MiB | data on disk MiB |",
		  "|---|---|---|---|",
		  ($all[] | select(.phase == "memory")
			| "| \(.backlog) | \(.rss_kib / 1024 | f(1)) | \(.hwm_kib / 1024 | f(1)) | \(.disk_kib / 1024 | f(0)) |"),
		  "",
		  "## Replies",
		  "",
		  "Every message sent in this run (warm-ups, fsync counts and backlogs included), by reply.\n",
		  "| server | runs | sent | 2xx | 4xx | 5xx | errors |",
		  "|---|---|---|---|---|---|---|",
		  ($all | map(select(.messages != null and .ok_2xx != null)) | group_by(.server)[]
			| "| \(.[0].server) | \(length) | \(map(.messages) | add) | \(map(.ok_2xx) | add) | \(map(.temp_4xx) | add) | \(map(.perm_5xx) | add) | \(map(.errors) | add) |")
	JQ
}
mkdir -p "$(dirname "$OUT")"
report | tee "$OUT"
log "report written to $OUT"

# A run in which any server refused or lost a message is a failed run.
bad=$(jq -s '[.[] | select(.ok_2xx != null and .ok_2xx != .messages)] | length' "$RESULTS")
((bad == 0)) || die "$bad load(s) had messages not accepted; see the Replies table"
