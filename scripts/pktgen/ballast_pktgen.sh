#!/bin/bash
# SPDX-License-Identifier: MIT OR Apache-2.0
#
# ballast_pktgen.sh: drive many UDP flows at a ballast VIP with the kernel's pktgen.
#
# For bare-metal hosts, where the pktgen module exists (CONFIG_NET_PKTGEN); the VMs ballast is
# developed on have none, and there `cargo xtask bench` (BPF_PROG_TEST_RUN) is the tool. In the
# style of the kernel's samples/pktgen/pktgen_sample03_burst_single_flow.sh, but every packet
# can be a new flow: source addresses and UDP source ports walk (or, with --random, jump
# through) the ranges given, so the load balancer hashes many flows, as in production.
#
# pktgen sends UDP only: aim it at a UDP VIP (or one serving every port of its address).
# Point -m at the load balancer's interface (or at the router in front of it).
#
# Usage: ballast_pktgen.sh -i DEV -d VIP -m MAC [options]
#   -i DEV          output device
#   -d VIP          destination: the VIP (IPv4, or IPv6 with -6)
#   -m MAC          destination MAC: the load balancer or the next hop toward it
#   -p PORT         VIP port (default 53)
#   -s SIZE         packet size in bytes, without the 4-byte CRC (default 64)
#   -c COUNT        packets per thread, 0 for no end (default 10000000)
#   -b BURST        times each skb is sent back to back (identical packets: one flow) (default 1)
#   -t THREADS      threads (one per CPU, kpktgend_N) (default 1)
#   -f FIRST        first thread / CPU (default 0)
#   -6              IPv6 (source ports still vary; the source address is fixed, --src6)
#   --src-min IP --src-max IP       IPv4 source range (default 198.18.0.1 - 198.18.255.254)
#   --src6 IP       IPv6 source (default 2001:db8:19::1)
#   --sport-min N --sport-max N     UDP source port range (default 1024 - 65535)
#   --flows N       concurrent flows pktgen keeps (default 4096, at most 65535)
#   --flowlen N     packets per flow before it moves on (default 4)
#   --random        random addresses and ports in the ranges (default: sequential)
#   --dry-run       print what would be written to /proc/net/pktgen, write nothing
#   -h              this help
set -o errexit -o nounset -o pipefail

PGDIR=/proc/net/pktgen
DRY_RUN=0
DEV=""
DEST_IP=""
DST_MAC=""
DST_PORT=53
PKT_SIZE=64
COUNT=10000000
BURST=1
THREADS=1
F_THREAD=0
IP6=""
SRC_MIN=198.18.0.1
SRC_MAX=198.18.255.254
SRC6=2001:db8:19::1
SPORT_MIN=1024
SPORT_MAX=65535
FLOWS=4096
FLOWLEN=4
RANDOM_FLOWS=0
SRC_RANGE_GIVEN=0

err() {
    echo "ballast_pktgen: $*" >&2
    exit 2
}

info() {
    echo "ballast_pktgen: $*" >&2
}

usage() {
    sed -n '/^# Usage:/,/^set -o/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# proc_cmd FILE COMMAND...: writes the command to a pktgen control file (or prints it).
proc_cmd() {
    local name=$1
    local file="$PGDIR/$name"
    shift
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "echo \"$*\" > $file"
        return 0
    fi
    echo "$*" > "$file"
    # pktgen reports on the thread and device files whether the last command was accepted.
    if [[ "$name" != pgctrl ]] && ! grep -q "Result: OK:" "$file"; then
        err "pktgen refused \"$*\" on $file: $(grep "Result:" "$file")"
    fi
}

pg_ctrl() { proc_cmd pgctrl "$@"; }
pg_thread() { local thread=$1; shift; proc_cmd "kpktgend_$thread" "$@"; }
pg_set() { local dev=$1; shift; proc_cmd "$dev" "$@"; }

need_value() {
    [[ $# -ge 2 && -n "$2" ]] || err "$1 needs a value"
}

is_uint() {
    [[ "$1" =~ ^[0-9]+$ ]]
}

is_ipv4() {
    local IFS=.
    local -a parts
    read -r -a parts <<< "$1"
    [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || return 1
    for part in "${parts[@]}"; do
        (( 10#$part <= 255 )) || return 1
    done
}

is_ipv6() {
    [[ "$1" =~ ^[0-9a-fA-F:]+$ && "$1" == *:* ]]
}

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -i) need_value "$@"; DEV=$2; shift 2 ;;
            -d) need_value "$@"; DEST_IP=$2; shift 2 ;;
            -m) need_value "$@"; DST_MAC=$2; shift 2 ;;
            -p) need_value "$@"; DST_PORT=$2; shift 2 ;;
            -s) need_value "$@"; PKT_SIZE=$2; shift 2 ;;
            -c) need_value "$@"; COUNT=$2; shift 2 ;;
            -b) need_value "$@"; BURST=$2; shift 2 ;;
            -t) need_value "$@"; THREADS=$2; shift 2 ;;
            -f) need_value "$@"; F_THREAD=$2; shift 2 ;;
            -6) IP6=6; shift ;;
            --src-min) need_value "$@"; SRC_MIN=$2; SRC_RANGE_GIVEN=1; shift 2 ;;
            --src-max) need_value "$@"; SRC_MAX=$2; SRC_RANGE_GIVEN=1; shift 2 ;;
            --src6) need_value "$@"; SRC6=$2; shift 2 ;;
            --sport-min) need_value "$@"; SPORT_MIN=$2; shift 2 ;;
            --sport-max) need_value "$@"; SPORT_MAX=$2; shift 2 ;;
            --flows) need_value "$@"; FLOWS=$2; shift 2 ;;
            --flowlen) need_value "$@"; FLOWLEN=$2; shift 2 ;;
            --random) RANDOM_FLOWS=1; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h|--help) usage; exit 0 ;;
            *) err "unknown option '$1' (-h for help)" ;;
        esac
    done
}

validate() {
    [[ -n "$DEV" ]] || err "-i DEV is required"
    [[ -n "$DEST_IP" ]] || err "-d VIP is required"
    [[ -n "$DST_MAC" ]] || err "-m MAC is required (the load balancer's, or the next hop's)"
    [[ "$DST_MAC" =~ ^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$ ]] || err "-m: '$DST_MAC' is not a MAC address"
    local name value
    for name in DST_PORT PKT_SIZE COUNT BURST THREADS F_THREAD SPORT_MIN SPORT_MAX FLOWS FLOWLEN; do
        value=${!name}
        is_uint "$value" || err "$name: '$value' is not a number"
    done
    (( DST_PORT <= 65535 )) || err "-p: $DST_PORT is not a port"
    (( SPORT_MIN <= SPORT_MAX && SPORT_MAX <= 65535 )) || err "--sport-min/--sport-max: $SPORT_MIN-$SPORT_MAX is not a port range"
    (( PKT_SIZE >= 60 )) || err "-s: $PKT_SIZE is below the 60-byte Ethernet minimum"
    (( THREADS >= 1 && BURST >= 1 )) || err "-t and -b are at least 1"
    (( FLOWS >= 1 && FLOWS <= 65535 && FLOWLEN >= 1 )) || err "--flows is 1 to 65535, --flowlen at least 1"
    if [[ -n "$IP6" ]]; then
        is_ipv6 "$DEST_IP" || err "-d: '$DEST_IP' is not an IPv6 address (-6 given)"
        is_ipv6 "$SRC6" || err "--src6: '$SRC6' is not an IPv6 address"
        [[ $SRC_RANGE_GIVEN -eq 0 ]] || err "--src-min/--src-max are IPv4 only; pktgen varies no IPv6 source (use --src6)"
    else
        is_ipv4 "$DEST_IP" || err "-d: '$DEST_IP' is not an IPv4 address (-6 for IPv6)"
        is_ipv4 "$SRC_MIN" || err "--src-min: '$SRC_MIN' is not an IPv4 address"
        is_ipv4 "$SRC_MAX" || err "--src-max: '$SRC_MAX' is not an IPv4 address"
    fi
}

check_host() {
    [[ $DRY_RUN -eq 1 ]] && return 0
    [[ $EUID -eq 0 ]] || err "needs root (writes $PGDIR)"
    if [[ ! -d $PGDIR ]]; then
        modprobe pktgen 2>/dev/null || err "no $PGDIR and 'modprobe pktgen' failed: this kernel has no pktgen (CONFIG_NET_PKTGEN)"
    fi
    [[ -e /sys/class/net/$DEV ]] || err "-i: no device '$DEV'"
}

configure_device() {
    local thread=$1
    local dev="$DEV@$thread"
    pg_thread "$thread" "rem_device_all"
    pg_thread "$thread" "add_device $dev"
    # Base config, as in pktgen_sample03_burst_single_flow.sh.
    pg_set "$dev" "flag QUEUE_MAP_CPU"
    pg_set "$dev" "count $COUNT"
    # clone_skb > 0 would send one flow's packet again and again: every skb is built anew.
    pg_set "$dev" "clone_skb 0"
    pg_set "$dev" "pkt_size $PKT_SIZE"
    pg_set "$dev" "delay 0"
    pg_set "$dev" "flag NO_TIMESTAMP"
    pg_set "$dev" "burst $BURST"
    # Destination: the VIP.
    pg_set "$dev" "dst_mac $DST_MAC"
    pg_set "$dev" "dst$IP6 $DEST_IP"
    pg_set "$dev" "udp_dst_min $DST_PORT"
    pg_set "$dev" "udp_dst_max $DST_PORT"
    # Sources: many flows. Each thread takes its own slice of the port range, so threads do
    # not send the same flows.
    local span=$(( (SPORT_MAX - SPORT_MIN + 1) / THREADS ))
    (( span >= 1 )) || span=1
    local index=$(( thread - F_THREAD ))
    local sport_min=$(( SPORT_MIN + index * span ))
    local sport_max=$(( index == THREADS - 1 ? SPORT_MAX : sport_min + span - 1 ))
    pg_set "$dev" "udp_src_min $sport_min"
    pg_set "$dev" "udp_src_max $sport_max"
    if [[ -n "$IP6" ]]; then
        pg_set "$dev" "src6 $SRC6"
    else
        pg_set "$dev" "src_min $SRC_MIN"
        pg_set "$dev" "src_max $SRC_MAX"
    fi
    if [[ $RANDOM_FLOWS -eq 1 ]]; then
        pg_set "$dev" "flag UDPSRC_RND"
        [[ -n "$IP6" ]] || pg_set "$dev" "flag IPSRC_RND"
    fi
    pg_set "$dev" "flows $FLOWS"
    pg_set "$dev" "flowlen $FLOWLEN"
    # A flow's packets go back to back before the next flow: kinder to caches, like traffic.
    pg_set "$dev" "flag FLOW_SEQ"
}

report() {
    local thread
    for ((thread = F_THREAD; thread < F_THREAD + THREADS; thread++)); do
        echo "Device: $DEV@$thread"
        grep -A2 "Result:" "$PGDIR/$DEV@$thread" || true
    done
}

main() {
    parse_args "$@"
    validate
    check_host
    [[ $DRY_RUN -eq 1 ]] && info "dry run: printing the pktgen commands, writing nothing"
    pg_ctrl "reset"
    local thread
    for ((thread = F_THREAD; thread < F_THREAD + THREADS; thread++)); do
        configure_device "$thread"
    done
    if [[ $DRY_RUN -eq 1 ]]; then
        pg_ctrl "start"
        return 0
    fi
    trap report SIGINT
    info "running on $DEV, $THREADS thread(s) toward $DEST_IP:$DST_PORT; ctrl-C to stop"
    pg_ctrl "start"
    report
}

main "$@"
