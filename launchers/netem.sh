#!/usr/bin/env bash
# Emulate a slow cluster network on one machine: N network namespaces ("hosts") joined
# through rate-limited veth links to one Linux bridge, and a launcher that runs one rank
# (or one torchrun node) per host, so every byte between ranks crosses a rate-limited link.
# Root only; needs iproute2 (ip, tc) and ethtool. Full documentation, with the exact
# benchmark commands: docs/netem.md.
#
#   netem.sh up N RATE [LATENCY]        build hosts distk-h0..distk-h{N-1}
#   netem.sh down                       remove every namespace this script built
#   netem.sh status                     list them with their qdiscs
#   netem.sh run [OPTS] N RATE [LATENCY] -- CMD [ARGS...]
#       up, then CMD once per host with RANK, WORLD_SIZE, LOCAL_RANK=0, MASTER_ADDR,
#       MASTER_PORT and GLOO_SOCKET_IFNAME set; waits for all, exits with the first
#       failure (stopping the other ranks), always tears down
#   netem.sh torchrun [OPTS] N RATE [LATENCY] -- [TORCHRUN_OPTS] SCRIPT|-m MODULE [ARGS...]
#       the same with one torchrun node per host (--nnodes N --node-rank I, static
#       rendezvous at MASTER_ADDR); NPROC_PER_NODE ranks per host (default 1)
#
# OPTS: --timeout SECONDS (stop every rank and fail after this long; exit 124),
#       --log-dir DIR (host I's stdout+stderr go to DIR/h<I>.log instead of the terminal;
#       at the end DIR/wire.tsv holds each host's link byte counters, tx and rx).
# RATE: a tc rate (100mbit, 1gbit, 10gbit, 500kbit...) or "none" (no limit).
# LATENCY: one-way delay added host to host, a tc time (0.1ms, 100us, 2ms) or 0 (default).
# Each host's link is limited to RATE in each direction (egress of both veth ends, like a
# full-duplex switch port), so a host sends at most RATE and receives at most RATE; a flow
# between two hosts crosses two limited links in series and gets RATE, not RATE/2. The
# shaper's bucket holds 1 ms of link time (at least one frame) and segmentation offloads
# are off, so a small message after an idle period also takes the time RATE implies.
# Addresses: host I is 198.18.0.(I+1)/24 (RFC 2544 benchmarking range), MASTER_ADDR is
# host 0 = 198.18.0.1. Environment: DISTK_NETEM_PREFIX (namespace prefix, default distk),
# MASTER_PORT (default 29500), NPROC_PER_NODE (torchrun form, default 1),
# NETEM_RDZV (torchrun form: static (default; node rank I = host I) or c10d),
# TORCHRUN (torchrun executable; default .venv/bin/torchrun, else the one on PATH).
set -euo pipefail

PREFIX="${DISTK_NETEM_PREFIX:-distk}"
SUBNET="198.18.0"          # inside 198.18.0.0/15 (RFC 2544); never any other range
HOST_IF="veth0"            # the host's end of its link, inside the host's namespace
BRIDGE_IF="br0"
MASTER_PORT="${MASTER_PORT:-29500}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$(basename "$0")"

die() { echo "$SELF: error: $*" >&2; exit 2; }
note() { echo "[netem] $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$SELF: must run as root: network namespaces, veth links and tc qdiscs need" \
             "CAP_NET_ADMIN (try: sudo $0 $*)" >&2
        exit 1
    fi
    local tool
    for tool in ip tc; do
        command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (install iproute2)"
    done
}

# ethtool turns segmentation offloads off on the links (see shape); only the commands that
# build links need it, so 'down' and 'status' still work without it.
require_ethtool() {
    command -v ethtool >/dev/null 2>&1 \
        || die "'ethtool' not found: it turns segmentation offloads off on the veth links," \
               "without which the rate limit lets small messages through at line speed" \
               "(install it: apt-get install ethtool)"
}

bridge_ns() { echo "${PREFIX}-br"; }
host_ns() { echo "${PREFIX}-h$1"; }
host_addr() { echo "${SUBNET}.$(($1 + 1))"; }

# Namespaces built by this script under $PREFIX (bridge and hosts), one per line.
our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' \
        | grep -E "^${PREFIX//./\\.}-(br|h[0-9]+)$" || true
}

check_count() {
    [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 250 ] \
        || die "N=$1 is invalid: allowed an integer in [1, 250] (one address per host)"
}

check_rate() {
    [ "$1" = none ] && return 0
    [[ "$1" =~ ^[0-9]+(\.[0-9]+)?([kmgt]?bit|[kmgt]?bps)$ ]] \
        || die "RATE=$1 is invalid: allowed a tc rate like 50mbit, 1gbit, 10gbit or 'none'"
}

check_latency() {
    [ "$1" = 0 ] && return 0
    [[ "$1" =~ ^[0-9]+(\.[0-9]+)?(s|ms|us)$ ]] \
        || die "LATENCY=$1 is invalid: allowed 0 or a tc time like 0.1ms, 100us, 2ms"
}

# RATE in bytes per second (tc units: bit = bits/s, bps = bytes/s).
rate_bytes_per_second() {
    awk -v r="$1" 'BEGIN {
        n = r; sub(/[a-z]+$/, "", n); u = substr(r, length(n) + 1)
        m = 1; p = substr(u, 1, 1)
        if (p == "k") m = 1e3; else if (p == "m") m = 1e6; else if (p == "g") m = 1e9;
        else if (p == "t") m = 1e12
        bytes = (u ~ /bps$/) ? n * m : n * m / 8
        printf "%.0f\n", bytes }'
}

# Turn segmentation and receive offloads off on DEV in namespace NS: with them veth hands
# the qdisc 64 KiB super-packets, so the bucket would have to hold 64 KiB and a message of
# that size would cross an idle link at line speed. Without them every packet is at most
# one MTU-sized frame.
offloads_off() {
    local ns="$1" dev="$2"
    ip netns exec "$ns" ethtool -K "$dev" tso off gso off gro off >/dev/null 2>&1 \
        || die "ethtool -K $dev tso off gso off gro off failed in namespace $ns"
}

# Largest frame tbf sees on DEV: the MTU plus the link-layer header (14 bytes on Ethernet).
frame_bytes() {
    local ns="$1" dev="$2" mtu
    mtu="$(ip netns exec "$ns" cat "/sys/class/net/$dev/mtu")"
    echo $((mtu + 14))
}

# tbf parameters for RATE (bytes/s) and the largest frame: "BURST LIMIT" in bytes.
# Bucket: 1 ms of link time, never less than one frame plus 64 bytes (tbf drops a packet
# larger than its bucket, and tc rounds the bucket to its clock's ticks, so it is given a
# little room over the frame). Queue: 50 ms of traffic, at least 100 frames, so TCP is
# paced by the shaper rather than by drops, also when several hosts send to one.
tbf_sizes() {
    local bps="$1" frame="$2" burst limit
    burst=$(( bps / 1000 > frame + 64 ? bps / 1000 : frame + 64 ))
    limit=$(( bps / 20 > 100 * frame ? bps / 20 : 100 * frame ))
    echo "$burst $limit"
}

# Limit egress of DEV in namespace NS to RATE, delaying every packet by DELAY first.
shape() {
    local ns="$1" dev="$2" rate="$3" delay="$4" parent="root"
    offloads_off "$ns" "$dev"
    if [ "$delay" != 0 ]; then
        ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: netem delay "$delay" \
            limit 100000
        parent="parent 1:1"
    fi
    [ "$rate" = none ] && return 0
    local burst limit
    read -r burst limit < <(tbf_sizes "$(rate_bytes_per_second "$rate")" \
                                      "$(frame_bytes "$ns" "$dev")")
    # shellcheck disable=SC2086  # $parent is two words on purpose
    ip netns exec "$ns" tc qdisc add dev "$dev" $parent handle 10: tbf rate "$rate" \
        burst "$burst" limit "$limit"
}

cmd_down() {
    local ns pids remaining
    remaining="$(our_namespaces)"
    [ -n "$remaining" ] || return 0
    # Processes still inside our namespaces (e.g. a rank that outlived a killed launcher):
    # TERM, a short grace period, then KILL, so the namespaces really go away.
    for ns in $remaining; do
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
    done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=""
        for ns in $remaining; do pids+="$(ip netns pids "$ns" 2>/dev/null || true) "; done
        [ -z "${pids// /}" ] && break
        sleep 0.2
    done
    # shellcheck disable=SC2086
    [ -z "${pids// /}" ] || kill -KILL $pids 2>/dev/null || true
    # Deleting a namespace destroys the veth ends inside it (and so their peers).
    for ns in $remaining; do ip netns del "$ns" 2>/dev/null || true; done
    for ns in $remaining; do
        if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
            echo "$SELF: warning: could not remove namespace $ns" >&2
        fi
    done
    note "removed $(echo "$remaining" | wc -l) namespaces (${PREFIX}-*)"
}

# Refuse when our namespaces are in use by live processes (another run); remove stale ones.
# Called before any teardown trap is set, so a refusal never tears down someone else's run.
claim_prefix() {
    local ns existing busy=""
    existing="$(our_namespaces)"
    if [ -n "$existing" ]; then
        for ns in $existing; do busy+="$(ip netns pids "$ns" 2>/dev/null || true)"; done
        if [ -n "$busy" ]; then
            echo "$SELF: namespaces ${PREFIX}-* are in use by running processes (another" \
                 "netem run?): set DISTK_NETEM_PREFIX to use other names, or stop it with" \
                 "'$SELF down'" >&2
            exit 3
        fi
        note "removing stale namespaces ${PREFIX}-* (left by an earlier run)"
        cmd_down
    fi
}

cmd_up() {
    local count="$1" rate="$2" delay="${3:-0}"
    check_count "$count"; check_rate "$rate"; check_latency "$delay"
    local br i ns
    br="$(bridge_ns)"
    ip netns add "$br"
    ip -n "$br" link set lo up
    if [ "$delay" != 0 ] && ! ip netns exec "$br" tc qdisc add dev lo root netem delay 1ms \
            2>/dev/null; then
        echo "$SELF: LATENCY=$delay needs the netem qdisc, which this kernel lacks" \
             "(CONFIG_NET_SCH_NETEM); use LATENCY 0 (rate limiting alone needs only tbf)" >&2
        exit 2
    fi
    [ "$delay" = 0 ] || ip netns exec "$br" tc qdisc del dev lo root
    ip -n "$br" link add "$BRIDGE_IF" type bridge stp_state 0 forward_delay 0
    ip -n "$br" link set "$BRIDGE_IF" up
    for ((i = 0; i < count; i++)); do
        ns="$(host_ns "$i")"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # Bridge port p<I> in the bridge namespace, its peer veth0 inside host I.
        ip -n "$br" link add "p$i" type veth peer name "$HOST_IF" netns "$ns"
        ip -n "$br" link set "p$i" master "$BRIDGE_IF"
        ip -n "$ns" addr add "$(host_addr "$i")/24" dev "$HOST_IF"
        shape "$ns" "$HOST_IF" "$rate" "$delay"   # host -> network (one-way delay here)
        shape "$br" "p$i" "$rate" 0               # network -> host
        ip -n "$br" link set "p$i" up
        ip -n "$ns" link set "$HOST_IF" up
    done
    note "up: $count hosts ${PREFIX}-h0..$((count - 1)) at $(host_addr 0)..$(host_addr \
$((count - 1))), $rate per direction per host, one-way latency $delay, interface $HOST_IF"
}

cmd_status() {
    local ns
    for ns in $(our_namespaces); do
        echo "== $ns"
        ip -n "$ns" -br addr
        ip netns exec "$ns" tc qdisc show | grep -v -E 'noqueue|pfifo_fast|qdisc mq' || true
    done
}

find_torchrun() {
    if [ -n "${TORCHRUN:-}" ]; then echo "$TORCHRUN"; return; fi
    if [ -x "$ROOT/.venv/bin/torchrun" ]; then echo "$ROOT/.venv/bin/torchrun"; return; fi
    command -v torchrun || die "torchrun not found: set TORCHRUN or run launchers/setup.sh"
}

# State of the run form, used by the traps.
PIDS=()
RUNNING=0
WATCHDOG=""

stop_ranks() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 30); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}

on_exit() {
    [ -z "$WATCHDOG" ] || kill "$WATCHDOG" 2>/dev/null || true
    if [ "$RUNNING" = 1 ]; then stop_ranks; fi
    cmd_down
}

cmd_run() {
    local form="$1"; shift
    local timeout="" log_dir=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --timeout) timeout="${2:?--timeout needs SECONDS}"; shift 2 ;;
            --log-dir) log_dir="${2:?--log-dir needs DIR}"; shift 2 ;;
            *) break ;;
        esac
    done
    [ -z "$timeout" ] || [[ "$timeout" =~ ^[0-9]+$ ]] \
        || die "--timeout $timeout is invalid: allowed a whole number of seconds"
    local positional=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do positional+=("$1"); shift; done
    [ $# -gt 0 ] || die "$form: missing '--' before the command (see $SELF --help)"
    shift
    [ $# -gt 0 ] || die "$form: no command after '--'"
    [ "${#positional[@]}" -ge 2 ] && [ "${#positional[@]}" -le 3 ] \
        || die "$form: expected N RATE [LATENCY] before '--', got: ${positional[*]}"
    local count="${positional[0]}" rate="${positional[1]}" delay="${positional[2]:-0}"
    check_count "$count"; check_rate "$rate"; check_latency "$delay"
    [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT=$MASTER_PORT is not a port number"
    local launch=() rdzv="${NETEM_RDZV:-static}"
    [ "$rdzv" = static ] || [ "$rdzv" = c10d ] \
        || die "NETEM_RDZV=$rdzv is invalid: allowed static (default) or c10d"
    if [ "$form" = torchrun ]; then
        launch=("$(find_torchrun)")
    fi
    [ -z "$log_dir" ] || mkdir -p "$log_dir"

    require_ethtool
    claim_prefix
    trap on_exit EXIT
    trap 'note "interrupted: stopping all ranks"; exit 130' INT
    trap 'note "terminated: stopping all ranks"; exit 143' TERM
    cmd_up "$count" "$rate" "$delay"

    local i ns master started
    master="$(host_addr 0)"
    started=$SECONDS
    RUNNING=1
    for ((i = 0; i < count; i++)); do
        ns="$(host_ns "$i")"
        local env_vars=(MASTER_ADDR="$master" MASTER_PORT="$MASTER_PORT"
                        GLOO_SOCKET_IFNAME="$HOST_IF" NCCL_SOCKET_IFNAME="$HOST_IF"
                        TP_SOCKET_IFNAME="$HOST_IF" DISTK_NETEM_HOST="$i"
                        DISTK_NETEM_RATE="$rate" DISTK_NETEM_LATENCY="$delay")
        local argv=()
        if [ "$form" = torchrun ]; then
            # --local-addr: the address this node advertises; the default (the machine's
            # hostname) resolves outside the namespace and is unreachable from it.
            argv=("${launch[@]}" --nnodes "$count" --nproc-per-node "${NPROC_PER_NODE:-1}"
                  --local-addr "$(host_addr "$i")")
            if [ "$rdzv" = static ]; then
                argv+=(--rdzv-backend static --node-rank "$i" --master-addr "$master"
                       --master-port "$MASTER_PORT")
            else
                # is_host: torchrun cannot tell that 198.18.0.1 is host 0's own address.
                argv+=(--rdzv-backend c10d --rdzv-endpoint "$master:$MASTER_PORT"
                       --rdzv-id "distk-netem-$$"
                       --rdzv-conf "is_host=$([ "$i" = 0 ] && echo true || echo false)")
            fi
            argv+=("$@")
        else
            env_vars+=(RANK="$i" WORLD_SIZE="$count" LOCAL_RANK=0 LOCAL_WORLD_SIZE=1
                       GROUP_RANK="$i" NODE_RANK="$i")
            argv=("$@")
        fi
        # setsid: each host's command leads its own process group, so stopping a rank
        # also stops its children (torchrun's workers).
        if [ -n "$log_dir" ]; then
            setsid ip netns exec "$ns" env "${env_vars[@]}" "${argv[@]}" \
                >"$log_dir/h$i.log" 2>&1 &
        else
            setsid ip netns exec "$ns" env "${env_vars[@]}" "${argv[@]}" &
        fi
        PIDS+=("$!")
    done
    if [ -n "$timeout" ]; then
        # A watchdog signals this script, whose EXIT trap stops the ranks and tears down.
        # Its output goes nowhere so it never holds the caller's pipes open.
        trap 'note "timeout after ${timeout}s: stopping all ranks"; exit 124' USR1
        (
            exec >/dev/null 2>&1
            sleep "$timeout" &
            trap 'kill $! 2>/dev/null; exit 0' TERM
            wait $! && kill -USR1 $$
        ) &
        WATCHDOG=$!
    fi

    # Poll rather than `wait -n`: bash cannot `wait -n` for a child it already reaped, and
    # the first failure must stop the others at once (they would block on the dead peer).
    local status=0 rc pid host
    local -A pending=()
    for host in "${!PIDS[@]}"; do pending[${PIDS[$host]}]="$host"; done
    while [ "${#pending[@]}" -gt 0 ]; do
        for pid in "${!pending[@]}"; do
            kill -0 "$pid" 2>/dev/null && continue
            rc=0
            wait "$pid" || rc=$?
            host="${pending[$pid]}"
            unset "pending[$pid]"
            if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
                status="$rc"
                note "host $host exited with status $rc: stopping the other ranks"
                stop_ranks
            fi
        done
        [ "${#pending[@]}" -eq 0 ] || sleep 0.2
    done
    RUNNING=0
    note "all $count hosts finished in $((SECONDS - started))s (status $status)"
    [ -z "$log_dir" ] || write_wire "$count" "$log_dir/wire.tsv"
    exit "$status"
}

# The bytes each host's link carried in this run (its veth0 counters, read before the
# teardown; the links are built fresh for each run, so they count from zero), one line
# per host: "h<I> <tx_bytes> <rx_bytes>". They include every frame: IP/TCP headers, the
# launch's rendezvous and any traffic besides the gradients.
write_wire() {
    local count="$1" path="$2" i ns stats="/sys/class/net/$HOST_IF/statistics"
    {
        echo "# host tx_bytes rx_bytes (veth0 counters, whole run)"
        for ((i = 0; i < count; i++)); do
            ns="$(host_ns "$i")"
            echo "h$i $(ip netns exec "$ns" cat "$stats/tx_bytes")" \
                 "$(ip netns exec "$ns" cat "$stats/rx_bytes")"
        done
    } >"$path" 2>/dev/null || note "could not read the links' byte counters into $path"
}

main() {
    local command="${1:-}"
    case "$command" in
        -h|--help|help|"") usage; [ -n "$command" ] || exit 2; exit 0 ;;
    esac
    shift
    require_root "$command" "$@"
    case "$command" in
        up)
            [ $# -ge 2 ] && [ $# -le 3 ] || die "usage: $SELF up N RATE [LATENCY]"
            check_count "$1"; check_rate "$2"; check_latency "${3:-0}"
            require_ethtool
            claim_prefix
            # A half-built network (a failing ip/tc command exits under set -e) is torn
            # down again.
            trap 'echo "$SELF: error while building the network: tearing down" >&2; cmd_down' \
                EXIT
            cmd_up "$@"
            trap - EXIT ;;
        down) cmd_down ;;
        status) cmd_status ;;
        run|torchrun) cmd_run "$command" "$@" ;;
        *) die "unknown command '$command': allowed up, down, status, run, torchrun" ;;
    esac
}

main "$@"
