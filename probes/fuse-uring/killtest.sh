#!/usr/bin/env bash
# killtest.sh KILLS: fio 4 KiB O_DIRECT random writes with verify (backlog, so
# reads interleave) on the probe's io_uring mount; the worker is killed -9
# KILLS times at random moments; the supervisor starts a successor each time.
set -u
# needs root, /dev/fuse, fio; the kernel offers FUSE over io_uring only with this on
echo Y > /sys/module/fuse/parameters/enable_uring
D0=${D:-/tmp/pu}; mkdir -p "$D0/mnt"
[[ -f $D0/back.img ]] || dd if=/dev/urandom of="$D0/back.img" bs=1M count=1024 status=none
P=${P:-$(dirname "$0")/target/release/fuse-uring-probe}; D=/tmp/pu; K=${1:-20}
rm -f /tmp/probe-stop; $P ${MODE:---supervise} $D/mnt $D/back.img 16 2>$D/sup.log & spid=$!; sleep 1
fio --name=v --filename=$D/mnt/disk --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --direct=1 \
  --size=1G --io_size=${IO_SIZE:-1G} --verify=crc32c --verify_backlog=4096 --continue_on_error=io --output-format=json >$D/fio.json 2>$D/fio.err & fpid=$!
for i in $(seq 1 $K); do sleep 0.$((RANDOM % 9 + 1)); kill -9 $(cat /tmp/probe-worker.pid) 2>/dev/null; done
wait $fpid; rc=$?; touch /tmp/probe-stop
python3 - $D/fio.json <<'PY'
import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]
print("fio errors", j["error"], "total_err", j.get("total_err"), "| writes", j["write"]["total_ios"], "verify reads", j["read"]["total_ios"],
      "| write clat max ms", round(j["write"]["clat_ns"]["max"]/1e6,1), "read clat max ms", round(j["read"]["clat_ns"]["max"]/1e6,1),
      "| runtime s", round(j["job_runtime"]/1000,1))
PY
echo "fio rc=$rc; kills survived: $(grep -c 'SIGKILL' $D/sup.log); takeover lines:"; grep takeover $D/sup.log | awk '{s+=$(NF-3); c+=$(NF-1)} END {print "re-served", s, "commits", c}'
umount $D/mnt; wait $spid
