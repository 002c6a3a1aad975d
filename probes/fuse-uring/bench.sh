#!/usr/bin/env bash
# bench.sh: native vs /dev/fuse vs io_uring transport of the probe, same
# handler, interleaved per run. RUNTIME, RUNS, SIZE env. Prints medians.
set -u
# needs root, /dev/fuse, fio; the kernel offers FUSE over io_uring only with this on
echo Y > /sys/module/fuse/parameters/enable_uring
D0=${D:-/tmp/pu}; mkdir -p "$D0/mnt"
[[ -f $D0/back.img ]] || dd if=/dev/urandom of="$D0/back.img" bs=1M count=1024 status=none
P=${P:-$(dirname "$0")/target/release/fuse-uring-probe}
D=${D:-/tmp/pu}; RUNTIME=${RUNTIME:-6}; RUNS=${RUNS:-3}
mkdir -p $D/mnt
jobs=("randread 4k libaio 16" "randwrite 4k libaio 16" "randwrite 4k psync 1" "write 1M libaio 4")
declare -A R
cpu_of() { local t=0 p; for p in $1 $(pgrep -P $1); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
for run in $(seq 1 $RUNS); do
  for mode in native dev uring sq; do
    if [[ $mode == native ]]; then f=$D/back.img; else
      if [[ $mode == sq ]]; then $P --supervise-sq $D/mnt $D/back.img 16 2>$D/$mode.log & pid=$!
      else $P $D/mnt $D/back.img $mode ${N:-} 2>$D/$mode.log & pid=$!; fi; sleep 0.7; f=$D/mnt/disk; fi
    for j in "${jobs[@]}"; do
      set -- $j
      c0=0; [[ $mode != native ]] && c0=$(cpu_of $pid)
      out=$(fio --name=t --filename=$f --rw=$1 --bs=$2 --ioengine=$3 --iodepth=$4 --direct=1 \
        --size=1G --runtime=$RUNTIME --time_based --group_reporting --output-format=json 2>/dev/null)
      c1=0; [[ $mode != native ]] && c1=$(cpu_of $pid)
      read iops p99 n < <(python3 -c '
import json,sys; j=json.load(sys.stdin)["jobs"][0]; k="read" if j["read"]["io_bytes"] else "write"
x=j[k]; print(round(x["iops"]), round(x["clat_ns"]["percentile"].get("99.000000",0)/1000), x["total_ios"])' <<<"$out")
      us=$(python3 -c "print(round(($c1-$c0)*10000/max($n,1),1))")  # ticks(10ms)->us per req
      R["$mode|$j"]+="$iops/$p99/$us "
    done
    [[ $mode != native ]] && { touch /tmp/probe-stop; umount $D/mnt; wait $pid 2>/dev/null; rm -f /tmp/probe-stop; }
  done
done
printf "%-24s %-20s %-20s %-20s %-20s %s\n" job "native iops/p99us" "dev iops/p99/cpu" "uring iops/p99/cpu" "sq iops/p99/cpu" "uring/dev sq/dev"
for j in "${jobs[@]}"; do
  med() { python3 -c "
import statistics,sys; v=[list(map(float,x.split('/'))) for x in sys.argv[1].split()]
print('/'.join(str(round(statistics.median(c),1)) for c in zip(*v)))" "$1"; }
  n=$(med "${R[native|$j]}"); d=$(med "${R[dev|$j]}"); u=$(med "${R[uring|$j]}"); q=$(med "${R[sq|$j]}")
  r=$(python3 -c "print(round(${u%%/*}/${d%%/*},2), round(${q%%/*}/${d%%/*},2))")
  printf "%-24s %-20s %-20s %-20s %-20s %s\n" "$j" "$n" "$d" "$u" "$q" "$r"
done
