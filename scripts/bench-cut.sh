#!/usr/bin/env bash
# Cost of a cut (release build): time of `vdrep cut DIR` with 0 / 64 MiB /
# 512 MiB dirty on one disk, and 4 KiB random-write IOPS (O_DIRECT, libaio
# QD16) during a cut that materialises 512 MiB vs the same job without a cut
# (the copy-before-write window). Medians of RUNS; nothing is asserted.
#
#   scripts/bench-cut.sh
#
# Environment: SIZE=1G (disk), RUNS=3, DIRTY="0 64 512" (MiB),
#   BENCH_ROOT=/var/tmp/vdrep-cutbench, VDREP=target/release/vdrep,
#   WRITE_S=12 (seconds of the random-write job), CUT_AT=3 (cut starts at).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIZE="${SIZE:-1G}"
RUNS="${RUNS:-3}"
DIRTY="${DIRTY:-0 64 512}"
BENCH_ROOT="${BENCH_ROOT:-/var/tmp/vdrep-cutbench}"
VDREP="${VDREP:-$REPO/target/release/vdrep}"
WRITE_S="${WRITE_S:-12}"
CUT_AT="${CUT_AT:-3}"
DATA="$BENCH_ROOT/data"
DISK="$DATA/disk.vhd"
RAW="$BENCH_ROOT/raw-$(date -u +%Y%m%dT%H%M%SZ)"

say() { printf '[bench-cut] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
for t in fio python3; do command -v "$t" >/dev/null || die "missing $t"; done
[[ -x "$VDREP" ]] || die "no vdrep binary at $VDREP (cargo build --release)"
mkdir -p "$DATA" "$RAW"

cleanup() { "$VDREP" umount "$DATA" >/dev/null 2>&1 || true; }
trap cleanup EXIT

SIZE_BYTES="$(numfmt --from=iec "${SIZE%B}")"
if [[ "$(stat -c %s "$DISK" 2>/dev/null || echo 0)" != "$SIZE_BYTES" ]]; then
    say "creating $DISK ($SIZE of random data)"
    rm -f "$DISK"
    head -c "$SIZE_BYTES" /dev/urandom > "$DISK"
    sync
fi
"$VDREP" mount "$DATA" >&2
"$VDREP" cut "$DATA" >/dev/null   # start from a clean cycle

now() { date +%s.%N; }
dirty() { # MiB: sequential 1 MiB O_DIRECT writes from offset 0
    [[ "$1" -gt 0 ]] || return 0
    fio --name=dirty --filename="$DISK" --rw=write --bs=1M --direct=1 --ioengine=psync \
        --size="${1}M" --offset=0 >/dev/null
}

# 1. Time to cut with D MiB dirty.
for d in $DIRTY; do
    for r in $(seq 1 "$RUNS"); do
        dirty "$d"
        sync
        t0="$(now)"
        "$VDREP" cut "$DATA" >/dev/null
        t1="$(now)"
        echo "cut $d $r $(echo "$t1 - $t0" | bc)" >> "$RAW/cut.txt"
        say "cut with $d MiB dirty, run $r: $(echo "$t1 - $t0" | bc) s"
    done
done

# 2. Random 4 KiB writes over the dirty 512 MiB, with and without a cut.
randwrite() { # LOGPREFIX
    fio --name=rw --filename="$DISK" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
        --iodepth=16 --size=512M --offset=0 --time_based=1 --runtime="$WRITE_S" \
        --log_unix_epoch=1 --log_avg_msec=250 --write_iops_log="$1" >/dev/null
}
for r in $(seq 1 "$RUNS"); do
    dirty 512
    "$VDREP" cut "$DATA" >/dev/null  # seal those; the next cut materialises the rewrites
    dirty 512
    randwrite "$RAW/nocut.$r" 
    dirty 512
    "$VDREP" cut "$DATA" >/dev/null
    dirty 512
    randwrite "$RAW/cut.$r" &
    pid=$!
    sleep "$CUT_AT"
    t0="$(now)"
    "$VDREP" cut "$DATA" >/dev/null
    t1="$(now)"
    wait "$pid"
    echo "window $r $t0 $t1" >> "$RAW/cut.txt"
    say "cut during random writes, run $r: $(echo "$t1 - $t0" | bc) s"
done

python3 - "$RAW" "$RUNS" <<'PY'
import glob, statistics, sys
raw, runs = sys.argv[1], int(sys.argv[2])
cuts, windows = {}, {}
for line in open(f"{raw}/cut.txt"):
    f = line.split()
    if f[0] == "cut":
        cuts.setdefault(int(f[1]), []).append(float(f[3]))
    else:
        windows[int(f[1])] = (float(f[2]) * 1000, float(f[3]) * 1000)
def iops_log(prefix):
    pts = []
    for p in glob.glob(prefix + "_iops*.log"):
        for line in open(p):
            t, v = line.split(",")[:2]
            pts.append((int(t), int(v)))
    return sorted(pts)
print("\ncut cost (release build; medians of %d)" % runs)
print("dirty MiB  cut time s  (runs)")
for d in sorted(cuts):
    print(f"{d:>9}  {statistics.median(cuts[d]):>10.3f}  {cuts[d]}")
inside, outside, base = [], [], []
for r in range(1, runs + 1):
    base.append(statistics.mean(v for _, v in iops_log(f"{raw}/nocut.{r}")))
    a, b = windows[r]
    pts = iops_log(f"{raw}/cut.{r}")
    # 250 ms samples whose interval lies inside the cut [a, b]
    ins = [v for t, v in pts if a + 250 <= t <= b]
    outs = [v for t, v in pts if t < a or t > b + 250]
    inside.append(statistics.mean(ins) if ins else float("nan"))
    outside.append(statistics.mean(outs) if outs else float("nan"))
m = statistics.median
print("\n4 KiB random writes, O_DIRECT QD16, over the 512 MiB being materialised")
print(f"without a cut:               {m(base):>8.0f} IOPS  {[round(x) for x in base]}")
print(f"during the cut (CBW window): {m(inside):>8.0f} IOPS  {[round(x) for x in inside]}  ({m(inside)/m(base):.2f}x)")
print(f"same run, outside the cut:   {m(outside):>8.0f} IOPS  {[round(x) for x in outside]}")
print(f"cut duration under load:     {m([(b-a)/1000 for a, b in windows.values()]):.3f} s")
PY
say "raw output: $RAW"
