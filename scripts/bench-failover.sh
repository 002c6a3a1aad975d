#!/usr/bin/env bash
# Test-failover speed (release build, root, /dev/fuse): time from
# `vdrep failover NAME --test` until `qemu-img info` reads the exposed VHD,
# for a 1 GiB and a 16 GiB sparse disk (a few MiB of data each), and the
# same for a point CYCLES cycles old (CYCLES syncs of a few scattered 4 KiB
# writes made after it). Medians of RUNS; nothing is asserted. Writes
# bench-results/failover-<time>.md.
#
#   scripts/bench-failover.sh
#
# Environment: SIZES="1G 16G", RUNS=5, CYCLES=100,
#   BENCH_ROOT=/var/tmp/vdrep-fobench, VDREP=target/release/vdrep
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIZES="${SIZES:-1G 16G}"
RUNS="${RUNS:-5}"
CYCLES="${CYCLES:-100}"
BENCH_ROOT="${BENCH_ROOT:-/var/tmp/vdrep-fobench}"
VDREP="${VDREP:-$REPO/target/release/vdrep}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$REPO/bench-results/failover-$STAMP.md"

say() { printf '[bench-failover] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
for t in qemu-img qemu-io python3; do command -v "$t" >/dev/null || die "missing $t"; done
[[ "$(id -u)" == 0 && -e /dev/fuse ]] || die "needs root and /dev/fuse"
if [[ -z "${VDREP_SKIP_BUILD:-}" ]]; then
    say "cargo build --release"
    (cd "$REPO" && cargo build --release -q)
fi
[[ -x "$VDREP" ]] || die "no vdrep binary at $VDREP"

rm -rf "$BENCH_ROOT"
mkdir -p "$BENCH_ROOT"/{ka,kb,vm,store,run} "$REPO/bench-results"
export VDREP_RUN_DIR="$BENCH_ROOT/run"
VM="$BENCH_ROOT/vm"
STORE="$BENCH_ROOT/store"
RECV_PID=""
cleanup() {
    "$VDREP" failover fovm --cleanup --store "$STORE" >/dev/null 2>&1 || true
    "$VDREP" umount "$VM" >/dev/null 2>&1 || "$VDREP" umount --lazy "$VM" >/dev/null 2>&1 || true
    [[ -n "$RECV_PID" ]] && kill "$RECV_PID" 2>/dev/null || true
}
trap cleanup EXIT

"$VDREP" keys init --name site-a --out "$BENCH_ROOT/ka" >/dev/null
"$VDREP" keys init --name site-b --out "$BENCH_ROOT/kb" >/dev/null
DISKS=()
for s in $SIZES; do
    f="$VM/disk-$s.img"
    truncate -s "$s" "$f"
    bytes="$(stat -c %s "$f")"
    # A few MiB of data spread over the disk; the rest stays a hole.
    for k in 0 1 2 3; do
        qemu-io -f raw -c "write -P 0x$((k + 17)) $((bytes / 4 * k)) 1M" "$f" >/dev/null
    done
    DISKS+=("$f")
done
"$VDREP" mount "$VM" --keys "$BENCH_ROOT/ka" >&2
"$VDREP" receive --listen 127.0.0.1:0 --store "$STORE" --keys "$BENCH_ROOT/kb" \
    --trust "$BENCH_ROOT/ka/site-a.crt" > "$BENCH_ROOT/recv.out" 2> "$BENCH_ROOT/recv.log" &
RECV_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$BENCH_ROOT/recv.out" 2>/dev/null && break; sleep 0.1; done
ADDR="$(awk '/listening on/ {print $3; exit}' "$BENCH_ROOT/recv.out")"
[[ -n "$ADDR" ]] || die "receiver did not start (see $BENCH_ROOT/recv.log)"
say "protecting ${DISKS[*]} -> $ADDR"
"$VDREP" protect fovm --to "$ADDR" --trust "$BENCH_ROOT/kb/site-b.crt" --every 1h "${DISKS[@]}" >&2
t0="$(date +%s.%N)"
"$VDREP" sync "$VM" --timeout 1800 >&2
say "initial replication took $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
FIRST="$("$VDREP" points fovm --store "$STORE" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["points"][0]["cycle"])')"

now() { date +%s.%N; }
# One run: expose POINT, wait until qemu-img info reads the VHD of SIZE, clean up.
expose_once() { # POINT SIZE -> seconds
    local point="$1" size="$2" t0 t1 path
    t0="$(now)"
    path="$("$VDREP" failover fovm --test --point "$point" --store "$STORE" 2>/dev/null | grep "disk-$size.vhd")"
    qemu-img info -f vpc "$path" >/dev/null
    t1="$(now)"
    "$VDREP" failover fovm --cleanup --store "$STORE" >/dev/null 2>&1
    python3 -c "print(f'{$t1 - $t0:.4f}')"
}
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v)*1000:.1f} ms (min {min(v)*1000:.1f}, max {max(v)*1000:.1f})")' "$@"; }

declare -A RES
for s in $SIZES; do
    v=()
    for _ in $(seq "$RUNS"); do v+=("$(expose_once latest "$s")"); done
    RES["$s"]="$(median "${v[@]}")"
    say "latest point, $s disk: ${RES[$s]}"
done

say "making $CYCLES more points (a sync each)"
first_size="${SIZES%% *}"
f="$VM/disk-$first_size.img"
bytes="$(stat -c %s "$f")"
t0="$(now)"
for i in $(seq "$CYCLES"); do
    # 8 scattered 4 KiB writes per cycle.
    args=()
    for k in $(seq 0 7); do args+=(-c "write -P $((i % 200 + 1)) $(( (bytes / 8 * k + i * 8192) / 4096 * 4096 )) 4k"); done
    qemu-io -f raw "${args[@]}" "$f" >/dev/null
    "$VDREP" sync "$VM" >/dev/null
done
say "$CYCLES syncs took $(python3 -c "print(round($(now) - $t0, 1))") s"
NPTS="$("$VDREP" points fovm --store "$STORE" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["points"]))')"
v=()
for _ in $(seq "$RUNS"); do v+=("$(expose_once "$FIRST" "$first_size")"); done
OLD="$(median "${v[@]}")"
say "point $CYCLES cycles old ($first_size disk): $OLD"

{
    echo "# Test failover: time to a readable VHD ($STAMP)"
    echo
    echo "\`vdrep failover --test\` → \`qemu-img info -f vpc\` succeeds, release build, median of $RUNS, git $(cd "$REPO" && git rev-parse --short HEAD), $(nproc) CPUs."
    echo
    echo "| case | time |"
    echo "|---|---|"
    for s in $SIZES; do echo "| newest point, $s sparse disk | ${RES[$s]} |"; done
    echo "| point $CYCLES cycles old ($first_size disk, $NPTS points kept) | $OLD |"
} | tee "$OUT"
say "written $OUT"
