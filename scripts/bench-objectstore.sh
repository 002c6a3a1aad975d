#!/usr/bin/env bash
# Object-store target (issue 11) figures, against a single-node Garage on
# loopback that each test starts on its own ports (root, /dev/fuse, Garage:
# scripts/lib.sh vdrep_install_garage). Sections:
#
# lazyboot: the tiny test VM booted from a test failover straight from the
#   bucket (`protect --to s3://`, then `failover --test --store s3:// --boot`
#   from a folder with no state; the guest mounts an ext4 disk of each size
#   in LAZYBOOT_SIZES and checks a 4 MiB file): bytes fetched from the
#   bucket against the disk size, from the view's counters, and the time
#   from the command to the guest's verdict (TCG, debug build) (test `boot_test_vm_from_the_bucket_lazily`
#   in tests/failover_test.rs, which prints `LAZY-BOOT`). A byte count, not a
#   time: the debug test build is enough. Target: < 10 % of the disk. Also
#   the time to expose the view (`failover --test --store s3://` returning),
#   from tests/objstore_e2e.rs (debug build; target < 1 s).
# store: the store seam alone, directory store vs Garage, initial copy of a
#   256 MiB disk and a 1 % delta, medians of 3 in one run (release build;
#   `bench_initial_and_delta_dir_vs_garage` in tests/replica_bucket.rs).
#
# initial: the initial copy of a SIZE (2G) random file and of a SIZE ext4
#   image ~20 % full (scripts/bench-images.sh, shared with
#   bench-replication.sh) to a fresh single-node Garage per round: vdrep
#   direct to the bucket (`protect --to s3://... --s3-endpoint
#   --s3-credentials --encryption-key`, then `sync`, timed end to end) vs
#   `rclone copy` of the same file into the same bucket (Debian's rclone
#   1.60 with its defaults; installed here with apt-get when missing, bench
#   only, CI never needs it) vs vdrep to a receiver on loopback (local
#   store, for reference). Interleaved per round, medians of RUNS, caches
#   dropped before each copy, the 1-min load beside each run. Target: vdrep
#   to Garage no slower than rclone. Also the sender's CPU and the bytes
#   each stored.
# rpo: `--every continuous` to s3:// on a fresh Garage (after an untimed
#   initial copy of the random image) under RPO_RATE (50m) of 4 KiB random
#   writes (fio, O_DIRECT, through the mount) for RPO_SECS (60); lag_secs
#   sampled every 0.5 s (benches/replication/lag-sample.py, the method of
#   bench-replication.sh). Target: p99 <= 5 s. The same against a local
#   receiver on loopback for reference (RPO_TARGETS="garage local"), with
#   the CPU of the sender and of Garage / the receiver, the points made
#   during the load with the payload each shipped (status bytes_sent), and
#   the lag every 5 s (growing = the path ships less than the load writes).
#
#   scripts/bench-objectstore.sh                 # every section
#   SECTIONS="initial rpo" VDREP=/path/to/release/vdrep scripts/bench-objectstore.sh
#   SECTIONS=lazyboot RUNS=1 scripts/bench-objectstore.sh
#
# Environment: SECTIONS="lazyboot store initial rpo", RUNS=3 (lazyboot boots
#   per size; initial rounds), LAZYBOOT_SIZES="256M 2G", SIZE=2G,
#   RPO_SECS=60, RPO_RATE=50m, BENCH_ROOT=/var/tmp/vdrep-rbench (the images
#   are cached there; the Garage data and mount folder live under it during
#   the run, ~3x SIZE), VDREP=target/release/vdrep (built when missing
#   unless NO_BUILD=1).
# Writes bench-results/objectstore-<time>.md; prints PASS/MISS per target.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECTIONS="${SECTIONS:-lazyboot store initial rpo}"
SIZE="${SIZE:-2G}"
RPO_SECS="${RPO_SECS:-60}"
RPO_RATE="${RPO_RATE:-50m}"
RPO_TARGETS="${RPO_TARGETS:-garage local}"
BENCH_ROOT="${BENCH_ROOT:-/var/tmp/vdrep-rbench}"
RUNS="${RUNS:-3}"
LAZYBOOT_SIZES="${LAZYBOOT_SIZES:-256M 2G}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$REPO/bench-results/objectstore-$STAMP.md"

say() { printf '[bench-objectstore] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
[[ "$(id -u)" == 0 && -e /dev/fuse ]] || die "needs root and /dev/fuse"
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
mkdir -p "$REPO/bench-results"
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/vdrep-osbench.XXXXXX")"
trap 'rm -rf "$LOGS"' EXIT
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }

{
    echo "# Object-store benchmark $STAMP"
    echo
    echo "Host: $(nproc) cores, $(uname -r); Garage: single node on loopback."
    echo
} > "$OUT"

if has lazyboot; then
    "$REPO/scripts/build-tiny-vm.sh" "$REPO/.vm" >&2 || die "building the tiny VM failed"
    rows=""
    for size in $LAZYBOOT_SIZES; do
        say "lazyboot: $RUNS boots of the tiny VM from a bucket view, $size disk"
        : > "$LOGS/pct"; : > "$LOGS/secs"
        for i in $(seq "$RUNS"); do
            (cd "$REPO" && VDREP_LAZYBOOT_DISK="$size" cargo test -q --test failover_test \
                boot_test_vm_from_the_bucket_lazily -- --exact --nocapture) > "$LOGS/boot$i.log" 2>&1 \
                || { cat "$LOGS/boot$i.log" >&2; die "lazyboot $size run $i failed"; }
            line="$(grep -m1 'LAZY-BOOT' "$LOGS/boot$i.log")" || die "run $i printed no LAZY-BOOT line"
            say "$size run $i: $line"
            echo "$line" | sed -E 's/.*\(([0-9.]+) %\).*/\1/' >> "$LOGS/pct"
            echo "$line" | sed -E 's/.*file at ([0-9.]+) s.*/\1/' >> "$LOGS/secs"
            echo "- $size run $i: \`$line\`" >> "$OUT.runs"
        done
        pct="$(median < "$LOGS/pct")"
        secs="$(median < "$LOGS/secs")"
        verdict="$(awk -v p="$pct" 'BEGIN { print (p < 10 ? "PASS" : "MISS") }')"
        say "lazyboot $size: median $pct % of the disk fetched: $verdict (target < 10 %), guest verdict at $secs s"
        rows+="| bytes fetched to boot the tiny VM, $size disk (median of $RUNS) | $pct % of the disk | < 10 % | $verdict |"$'\n'
        rows+="| command to the guest's verdict, $size disk (TCG, debug build) | $secs s | - | - |"$'\n'
    done
    say "expose time: tests/objstore_e2e.rs"
    (cd "$REPO" && cargo test -q --test objstore_e2e -- --nocapture) > "$LOGS/e2e.log" 2>&1 \
        || { cat "$LOGS/e2e.log" >&2; die "objstore_e2e failed"; }
    expose="$(grep -m1 -oE 'exposed the view in [0-9]+ ms' "$LOGS/e2e.log" | grep -oE '[0-9]+')"
    everdict="$(awk -v t="$expose" 'BEGIN { print (t < 1000 ? "PASS" : "MISS") }')"
    {
        echo "## lazyboot"
        echo
        echo "| figure | value | target | verdict |"
        echo "|---|---|---|---|"
        printf '%s' "$rows"
        echo "| failover --test --store s3:// exposed (debug build) | $expose ms | < 1 s | $everdict |"
        echo
        cat "$OUT.runs"
        echo
    } >> "$OUT"
    rm -f "$OUT.runs"
fi

if has store; then
    say "store: directory store vs Garage (release build)"
    (cd "$REPO" && cargo test --release -q --test replica_bucket -- --ignored bench --nocapture) \
        > "$LOGS/store.log" 2>&1 || { cat "$LOGS/store.log" >&2; die "store bench failed"; }
    {
        echo "## store"
        echo
        echo '```'
        grep -E 'median|initial|delta' "$LOGS/store.log" || cat "$LOGS/store.log"
        echo '```'
        echo
    } >> "$OUT"
fi

# --- initial / rpo: vdrep and rclone against a Garage this script starts ---
if has initial || has rpo; then
    . "$REPO/scripts/lib.sh"
    VDREP="${VDREP:-$REPO/target/release/vdrep}"
    if [[ "${NO_BUILD:-0}" != 1 && ! -x "$VDREP" ]]; then
        say "cargo build --release"
        (cd "$REPO" && cargo build --release -q) || die "cargo build --release failed"
    fi
    [[ -x "$VDREP" ]] || die "no vdrep binary at $VDREP (VDREP=path, or build with cargo build --release)"
    GARAGE_BIN="$(vdrep_garage_path)" || die "no garage (scripts/lib.sh vdrep_install_garage builds it)"
    if has initial && ! command -v rclone >/dev/null; then
        # bench-only: the baseline tool; CI never runs this section
        say "rclone missing (the baseline of the initial copy): apt-get install rclone"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rclone >&2 \
            || die "apt-get install rclone failed: install rclone (Debian 12: 1.60) and rerun"
    fi
    command -v fio >/dev/null || die "missing fio (apt-get install fio)"
    SIZE_BYTES="$(numfmt --from=iec "${SIZE%B}")"
    PRISTINE="$BENCH_ROOT/pristine-$SIZE_BYTES"   # shared with bench-replication.sh
    kinds=random; has initial && kinds="random ext4"
    "$REPO/scripts/bench-images.sh" "$PRISTINE" "$SIZE" $kinds || die "making the test images failed"
    W="$BENCH_ROOT/os-$STAMP"
    VSRC="$W/src" VM=osbench
    mkdir -p "$W" "$VSRC"
    "$VDREP" keys init --name site-a --out "$W/ka" >/dev/null
    "$VDREP" keys init --name site-b --out "$W/kb" >/dev/null
    "$VDREP" keys encryption-key --out "$W/enc.key" >/dev/null
    G_PID="" RECV_PID=""
    now() { date +%s.%N; }
    secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
    load1() { awk '{ print $1 }' /proc/loadavg; }
    drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
    free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0; }
    mounted() { [[ "$(findmnt -n -o FSTYPE --mountpoint "$VSRC" 2>/dev/null | tail -1)" == fuse* ]]; }
    umount_src() { mounted && { "$VDREP" umount "$VSRC" >/dev/null 2>&1 || umount -l "$VSRC"; }; return 0; }
    garage_stop() {
        [[ -n "$G_PID" ]] && { kill "$G_PID" 2>/dev/null; wait "$G_PID" 2>/dev/null || true; }
        G_PID=""; rm -rf "$W/garage"
    }
    recv_stop() { [[ -n "$RECV_PID" ]] && { kill "$RECV_PID" 2>/dev/null; wait "$RECV_PID" 2>/dev/null || true; }; RECV_PID=""; }
    trap 'rc=$?; set +e; umount_src; recv_stop; garage_stop; rm -rf "$W"
          if [[ $rc == 0 ]]; then rm -rf "$LOGS"; else say "FAILED (rc $rc); logs in $LOGS"; fi' EXIT
    gcli() { # garage ARGS, retried for 20 s while the node starts (as tests/garageutil)
        local i
        for i in $(seq 100); do
            "$GARAGE_BIN" -c "$W/garage/garage.toml" "$@" 2>>"$W/garage/cli.log" && return 0
            sleep 0.2
        done
        die "garage $* failed (see $W/garage/cli.log, $W/garage/server.log)"
    }
    # A fresh single-node Garage (as tests/garageutil: own ports, sqlite, no
    # compression) with one key and the bucket vdrep-bench, data under $W/garage.
    garage_start() {
        garage_stop
        mkdir -p "$W/garage"
        local s3 rpc adm secret id
        s3="$(free_port)" rpc="$(free_port)" adm="$(free_port)"
        cat >"$W/garage/garage.toml" <<EOF
metadata_dir = "$W/garage/meta"
data_dir = "$W/garage/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$adm"
EOF
        RUST_LOG=warn "$GARAGE_BIN" -c "$W/garage/garage.toml" server >"$W/garage/server.log" 2>&1 &
        G_PID=$!
        id="$(gcli node id -q | cut -d@ -f1)"
        gcli layout assign -z dc0 -c 100G "${id:0:16}" >/dev/null
        gcli layout apply --version 1 >/dev/null
        G_KEY="GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
        secret="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
        gcli key import -n bench --yes "$G_KEY" "$secret" >/dev/null
        gcli bucket create vdrep-bench >/dev/null
        gcli bucket allow --read --write --owner vdrep-bench --key bench >/dev/null
        G_ENDPOINT="http://127.0.0.1:$s3"
        printf 'access_key_id = "%s"\nsecret_access_key = "%s"\nregion = "garage"\n' "$G_KEY" "$secret" >"$W/s3.toml"
        # rclone's remote "garage:", from the environment (no config file)
        export RCLONE_CONFIG_GARAGE_TYPE=s3 RCLONE_CONFIG_GARAGE_PROVIDER=Other \
            RCLONE_CONFIG_GARAGE_ACCESS_KEY_ID="$G_KEY" RCLONE_CONFIG_GARAGE_SECRET_ACCESS_KEY="$secret" \
            RCLONE_CONFIG_GARAGE_ENDPOINT="$G_ENDPOINT" RCLONE_CONFIG_GARAGE_REGION=garage \
            RCLONE_CONFIG_GARAGE_FORCE_PATH_STYLE=true
    }
    recv_start() { # a receiver on loopback into $W/store (the local-store reference)
        recv_stop; rm -rf "$W/store"; mkdir -p "$W/store"
        vdrep_bench_receiver "$VDREP" "$W/store" "$W/kb" "$W/ka/site-a.crt" "$LOGS" \
            || die "receiver did not start (see $LOGS/receiver.log)"
    }
    src_mount() { # IMAGE: a fresh mount folder holding a copy of IMAGE as disk.img
        umount_src; rm -rf "$VSRC"; mkdir -p "$VSRC"
        cp --sparse=always "$1" "$VSRC/disk.img"
        "$VDREP" mount "$VSRC" --keys "$W/ka" --log-file "$LOGS/sender.log" || die "vdrep mount failed"
        mounted || die "vdrep mount returned but $VSRC is not a FUSE mount"
        SENDER_PID="$("$VDREP" status "$VSRC" --json | jq -r '.worker.pid // .pid')"
    }
    protect() { # TARGET EVERY: TARGET = garage:PREFIX or local
        local to=()
        case "$1" in
        garage:*) to=(--to "s3://vdrep-bench/${1#garage:}" --s3-endpoint "$G_ENDPOINT"
                      --s3-credentials "$W/s3.toml" --encryption-key "$W/enc.key") ;;
        local) to=(--to "$RECV_ADDR" --trust "$W/kb/site-b.crt") ;;
        esac
        "$VDREP" protect "$VM" "${to[@]}" --every "$2" "$VSRC/disk.img" >>"$LOGS/protect.log" 2>&1 \
            || die "vdrep protect failed: $(tail -3 "$LOGS/protect.log")"
    }
    # rclone 1.60's s3 backend refuses to start when AWS_CA_BUNDLE is set
    # ("LoadCustomCABundleError ... unsupported transport"); Garage is plain
    # http on loopback here, so it needs no CA bundle.
    rcl() { env -u AWS_CA_BUNDLE rclone "$@"; }
    vm_fields() { # the VM's newest point (cycle) and payload bytes sent
        "$VDREP" status "$VSRC" --json | jq -r --arg vm "$VM" '.replication[] | select(.vm == $vm) | "\(.last_point // 0) \(.bytes_sent)"'
    }
    bucket_bytes() { # bytes under PREFIX in the bucket, "?" if rclone cannot list them
        { rcl size --json "garage:vdrep-bench/$1" 2>>"$LOGS/rclone-size.log" || echo '{}'; } | jq -r '.bytes // "?"'
    }
fi

if has initial; then
    # One round = a fresh Garage; per kind: vdrep to Garage, rclone, vdrep
    # to a local receiver (interleaved, so load drifts hit all three).
    : >"$LOGS/initial.tsv"
    for run in $(seq "$RUNS"); do
        garage_start
        for kind in $kinds; do
            img="$PRISTINE/$kind.img"
            for tool in vdrep-garage rclone vdrep-local; do
                case "$tool" in
                rclone)
                    drop_caches; l="$(load1)"; t0="$(now)"
                    rcl copy "$img" "garage:vdrep-bench/rclone-$kind-$run/" >"$LOGS/rclone.log" 2>&1 \
                        || die "rclone copy failed: $(tail -3 "$LOGS/rclone.log")"
                    secs="$(secs_since "$t0")" cpu=-
                    stored="$(bucket_bytes "rclone-$kind-$run")"
                    ;;
                vdrep-*)
                    [[ "$tool" == vdrep-local ]] && recv_start
                    src_mount "$img"
                    target=local; [[ "$tool" == vdrep-garage ]] && target="garage:vdrep-$kind-$run"
                    drop_caches; l="$(load1)"; c0="$(cpu_secs "$SENDER_PID")"; t0="$(now)"
                    protect "$target" 1h
                    "$VDREP" sync "$VM" --timeout 1800 >>"$LOGS/sync.log" 2>&1 || die "vdrep sync failed ($tool $kind run $run)"
                    secs="$(secs_since "$t0")"
                    cpu="$(awk -v a="$c0" -v b="$(cpu_secs "$SENDER_PID")" 'BEGIN { printf "%.1f", b - a }')"
                    stored=-
                    [[ "$tool" == vdrep-garage ]] && stored="$(bucket_bytes "vdrep-$kind-$run")"
                    [[ "$tool" == vdrep-local ]] && stored="$(du -sB1 "$W/store" | cut -f1)"
                    umount_src; recv_stop; rm -rf "$W/store"
                    ;;
                esac
                printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$tool" "$run" "$secs" "$l" "$cpu $stored" >>"$LOGS/initial.tsv"
                say "initial $kind run $run/$RUNS: $tool $secs s (load $l, sender CPU $cpu s, stored $stored B)"
            done
        done
        garage_stop
    done
    {
        echo "## initial copy ($SIZE, to a fresh single-node Garage each round; vdrep release build $VDREP)"
        echo
        echo "Timed from \`protect\` to \`sync\` returning (vdrep) or the \`rclone copy\` (1.60, defaults: 4 transfers, 5 MiB parts, 4 part uploads at once) of the file; caches dropped before each."
        echo "The load (1-min average) is the one at each copy's start."
        echo
        echo "| image | vdrep to Garage (s) | rclone to Garage (s) | vdrep to local receiver (s) | vdrep / rclone | target | verdict |"
        echo "|---|---|---|---|---|---|---|"
    } >>"$OUT"
    for kind in $kinds; do
        med() { awk -F'\t' -v k="$kind" -v t="$1" '$1 == k && $2 == t { print $4 }' "$LOGS/initial.tsv" | median; }
        vg="$(med vdrep-garage)" rc="$(med rclone)" vl="$(med vdrep-local)"
        ratio="$(awk -v a="$vg" -v b="$rc" 'BEGIN { printf "%.2f", a / b }')"
        verdict="$(awk -v r="$ratio" 'BEGIN { print (r <= 1.0 ? "PASS" : "MISS") }')"
        say "initial $kind: vdrep to Garage $vg s, rclone $rc s (ratio $ratio): $verdict; local receiver $vl s"
        echo "| $kind (median of $RUNS) | $vg | $rc | $vl | $ratio | <= 1 | $verdict |" >>"$OUT"
    done
    {
        echo
        echo "Runs (image, tool, round, seconds, load, sender CPU s, bytes stored):"
        echo
        echo '```'
        cat "$LOGS/initial.tsv"
        echo '```'
        echo
    } >>"$OUT"
fi

if has rpo; then
    {
        echo "## continuous RPO under churn ($SIZE random image, release build)"
        echo
        echo "fio 4 KiB random writes, O_DIRECT, iodepth 16, through the mount, rate $RPO_RATE for ${RPO_SECS} s, \`--every continuous\` after an untimed initial copy; lag_secs from \`vdrep status --json\` every 0.5 s. Garage: s3:// on a fresh single node; local: a receiver on loopback (reference, same run). CPU in seconds over the load; the store's is Garage's or the receiver's."
        echo
        echo "| target | lag p99 | p50 | max | samples | fio MB/s | shipped MB/s | points (MB each) | sender CPU | store CPU | drain | load start/end | target | verdict |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    } >>"$OUT"
    timeline=""
    for target in $RPO_TARGETS; do
        say "rpo $target: untimed initial copy of the $SIZE random image"
        if [[ "$target" == garage ]]; then
            garage_start; to=garage:vdrep-rpo; store_pid="$G_PID"
        else
            recv_start; to=local; store_pid="$RECV_PID"
        fi
        src_mount "$PRISTINE/random.img"
        protect "$to" 1h
        "$VDREP" sync "$VM" --timeout 1800 >>"$LOGS/sync.log" 2>&1 || die "vdrep sync failed (rpo $target setup)"
        protect "$to" continuous
        "$VDREP" sync "$VM" --timeout 600 >>"$LOGS/sync.log" 2>&1 || die "vdrep sync failed (rpo $target continuous)"
        l0="$(load1)"; c0="$(cpu_secs "$SENDER_PID")"; g0="$(cpu_secs "$store_pid")"
        read -r p0 b0 < <(vm_fields)
        say "rpo $target: fio $RPO_RATE of 4 KiB random writes (O_DIRECT, through the mount) for ${RPO_SECS}s; lag sampled every 0.5 s"
        fio --name=churn --filename="$VSRC/disk.img" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
            --iodepth=16 --rate="$RPO_RATE" --time_based --runtime="$RPO_SECS" --randrepeat=0 --refill_buffers \
            --output-format=json --output="$LOGS/fio-rpo.json" >/dev/null 2>"$LOGS/fio-rpo.err" &
        fio_pid=$!
        python3 "$REPO/benches/replication/lag-sample.py" --relative "$VDREP" "$VSRC" "$VM" "$RPO_SECS" >"$LOGS/lag-$target.tsv"
        wait "$fio_pid" || say "warning: fio failed: $(tail -2 "$LOGS/fio-rpo.err")"
        cpu="$(awk -v a="$c0" -v b="$(cpu_secs "$SENDER_PID")" 'BEGIN { printf "%.1f", b - a }')"
        gcpu="$(awk -v a="$g0" -v b="$(cpu_secs "$store_pid")" 'BEGIN { printf "%.1f", b - a }')"
        l1="$(load1)"
        read -r p1 b1 < <(vm_fields)
        # points made during the load and what each shipped (payload after lz4)
        cycles="$(awk -v a="$p0" -v b="$p1" 'BEGIN { print b - a }')"
        per="$(awk -v n="$cycles" -v a="$b0" -v b="$b1" 'BEGIN { printf "%.1f", (n > 0 ? (b - a) / n / 1e6 : 0) }')"
        sent="$(awk -v a="$b0" -v b="$b1" -v t="$RPO_SECS" 'BEGIN { printf "%.1f", (b - a) / t / 1e6 }')"
        t0="$(now)"
        "$VDREP" sync "$VM" --timeout 600 >>"$LOGS/sync.log" 2>&1 || say "warning: sync after the rpo load failed"
        drain="$(secs_since "$t0")"
        bw="$(jq '.jobs[0].write.bw_bytes' "$LOGS/fio-rpo.json" 2>/dev/null || echo 0)"
        read -r n p50 p99 max < <(cut -f2 "$LOGS/lag-$target.tsv" | grep -v '^$' | sort -g | awk '{ v[NR] = $1 }
            END { if (!NR) { print 0, "-", "-", "-"; exit }
                  i = int(NR * 0.99); if (i < 1) i = 1
                  print NR, v[int((NR + 1) / 2)], v[i], v[NR] }')
        errs="$(grep -c 'error:' "$LOGS/lag-$target.tsv" || true)"
        verdict="$(awk -v p="$p99" 'BEGIN { print (p != "-" && p <= 5 ? "PASS" : "MISS") }')"
        [[ "$target" == garage ]] || verdict="($verdict, reference)"
        say "rpo $target: lag p50 $p50 s p99 $p99 s max $max s ($n samples, $errs failed): $verdict (target p99 <= 5 s); fio $bw B/s; CPU sender $cpu s, store $gcpu s; drain $drain s; $cycles points, $per MB each, $sent MB/s shipped"
        echo "| $target | $p99 s | $p50 s | $max s | $n ($errs failed) | $((bw / 1000000)) | $sent | $cycles ($per) | $cpu s | $gcpu s | $drain s | $l0 / $l1 | <= 5 s | $verdict |" >>"$OUT"
        # the lag every 5 s of the load: growing = the path ships less than the load writes
        timeline+="- $target: $(awk -F'\t' '$2 != "" && $1 >= next_t { printf "%ds %.1f  ", $1, $2; next_t = int($1 / 5 + 1) * 5 }' "$LOGS/lag-$target.tsv")"$'\n'
        umount_src; garage_stop; recv_stop
    done
    {
        echo
        echo "Lag (s) every 5 s of the load:"
        echo
        printf '%s' "$timeline"
        echo
    } >>"$OUT"
fi

say "wrote $OUT"
cat "$OUT"
