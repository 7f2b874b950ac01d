#!/usr/bin/env bash
# Put the host end of a test NIC into its own network namespace.
#
# usage: netns.sh up NS IFNAME HOSTIP/PREFIX [MTU]
#          Creates network namespace NS, waits up to 10 s for interface IFNAME
#          (e.g. the TAP a daemon or QEMU creates) to appear in this namespace,
#          moves it into NS, brings lo up, sets MTU if given, assigns
#          HOSTIP/PREFIX to IFNAME and brings it up.  Fails (and deletes NS
#          again) if any step fails, or if NS already exists.
#        netns.sh down NS
#          Deletes NS if it exists (interfaces inside it, such as a moved TAP,
#          go with it).  Exit 0 also if NS did not exist.
# Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).  Run a command in the namespace
# with `ip netns exec NS ping -c 3 10.77.0.2`.
#
# The namespace keeps a test's TAP and its address invisible to the rest of
# the machine: nothing routes to it, and a second test can use the same
# addresses in another namespace.  A file descriptor attached to the TAP (the
# backend's or QEMU's) keeps working after the move.
# Exit status: 0 ok, 1 failure, 3 usage error.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 3; }
log() { echo "netns: $*" >&2; }
die() { log "error: $*"; exit 1; }

ns_exists() { ip netns list | awk '{ print $1 }' | grep -qxF -- "$1"; }

[[ $# -ge 2 ]] || usage
cmd="$1" ns="$2"
[[ "$ns" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || { log "bad namespace name: $ns"; exit 3; }

case "$cmd" in
up)
    [[ $# -eq 4 || $# -eq 5 ]] || usage
    ifname="$3" addr="$4" mtu="${5:-}"
    [[ "$ifname" =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || { log "bad interface name: $ifname"; exit 3; }
    [[ "$addr" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ ]] || { log "bad HOSTIP/PREFIX: $addr"; exit 3; }
    [[ -z "$mtu" || "$mtu" =~ ^[1-9][0-9]*$ ]] || { log "bad MTU: $mtu"; exit 3; }
    ns_exists "$ns" && die "namespace $ns already exists"
    for ((i = 0; i < 100; i++)); do
        [[ -e "/sys/class/net/$ifname" ]] && break
        sleep 0.1
    done
    [[ -e "/sys/class/net/$ifname" ]] || die "no interface $ifname after 10s"
    ip netns add "$ns" || die "ip netns add $ns failed"
    # from here on, undo the namespace on failure
    undo() { ip netns del "$ns" 2> /dev/null || true; die "$*"; }
    ip link set dev "$ifname" netns "$ns" || undo "cannot move $ifname into $ns"
    ip -n "$ns" link set dev lo up || undo "cannot bring lo up in $ns"
    [[ -z "$mtu" ]] || ip -n "$ns" link set dev "$ifname" mtu "$mtu" || undo "cannot set mtu $mtu on $ifname"
    ip -n "$ns" addr add "$addr" dev "$ifname" || undo "cannot add $addr to $ifname"
    ip -n "$ns" link set dev "$ifname" up || undo "cannot bring $ifname up"
    log "$ifname is up in namespace $ns with $addr${mtu:+ mtu $mtu}"
    ;;
down)
    [[ $# -eq 2 ]] || usage
    if ns_exists "$ns"; then
        ip netns del "$ns" || die "ip netns del $ns failed"
        log "deleted namespace $ns"
    fi
    ;;
*) usage ;;
esac
