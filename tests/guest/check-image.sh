#!/usr/bin/env bash
# Check on the host that a disk image holds what a `write`-mode guest wrote.
#
# usage: check-image.sh IMAGE 'UVDPA-GUEST-RESULT: PASS md5=... offsets=... bs=...'
#   (the result line may also be given as just "md5=... offsets=... bs=...")
# Reads bs bytes at each byte offset, concatenates them in order and compares
# the md5 with the reported one.  Exit 0 if equal, 1 if not, 3 on bad usage.
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: $0 IMAGE RESULT_LINE" >&2; exit 3; }
img="$1" line="${2//$'\r'/}"
md5="" offsets="" bs=""
for kv in $line; do
    case "$kv" in
        md5=*) md5="${kv#*=}" ;;
        offsets=*) offsets="${kv#*=}" ;;
        bs=*) bs="${kv#*=}" ;;
    esac
done
[[ "$md5" =~ ^[0-9a-f]{32}$ && "$offsets" =~ ^[0-9]+(,[0-9]+)*$ && "$bs" =~ ^[1-9][0-9]*$ ]] ||
    { echo "check-image: no valid md5=/offsets=/bs= in: $line" >&2; exit 3; }
[[ -r "$img" ]] || { echo "check-image: cannot read $img" >&2; exit 3; }

got="$(
    IFS=,
    for off in $offsets; do
        dd if="$img" bs="$bs" skip="$off" count=1 iflag=skip_bytes status=none
    done | md5sum | cut -d' ' -f1
)"
if [[ "$got" == "$md5" ]]; then
    echo "check-image: OK $img md5=$got"
else
    echo "check-image: MISMATCH $img md5=$got expected=$md5" >&2
    exit 1
fi
