#!/usr/bin/env bash
# Failover speed (release build, root, /dev/fuse). Two sections:
#
# disks: time from `vdrep failover NAME --test` until `qemu-img info` reads
#   the exposed VHD, for a 1 GiB and a 16 GiB sparse disk (a few MiB of data
#   each), and the same for a point CYCLES cycles old (CYCLES syncs of a few
#   scattered 4 KiB writes made after it).
# domain: a protected libvirt domain running the tiny test VM (TCG, idle
#   mode: the guest agent answers until it is shut down), one per size in
#   DOMAIN_SIZES (a raw disk with DOMAIN_DATA_PCT % of it written in 8
#   extents): time from `failover --test --domain` and from `failover
#   --unplanned --domain` to the guest agent's `guest-ping` answering, split
#   into vdrep's share (the command's run: definition, checks, expose or
#   promote, network, define, `virsh start` returned; its own steps are the
#   `timing` of its --json) and the guest's share (from there to the first
#   guest-ping answer, polled every 100 ms). Target: vdrep's share < 1 s at
#   every size. Needs libvirt (started here if it does not answer: virtlogd
#   -d, libvirtd -d) and the tiny VM (scripts/build-tiny-vm.sh .vm).
#
# Medians of RUNS; nothing is asserted. Writes bench-results/failover-<time>.md.
#
#   scripts/bench-failover.sh            # both sections
#   SECTIONS=domain scripts/bench-failover.sh
#
# Environment: SECTIONS="disks domain", SIZES="1G 16G", RUNS=5 (domain: 3),
#   BASE_VDREP=path (domain: a baseline binary timed run by run beside it),
#   CYCLES=100, DOMAIN_SIZES="64M 8G", DOMAIN_DATA_PCT=6,
#   BENCH_ROOT=/var/tmp/vdrep-fobench, VDREP=target/release/vdrep
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECTIONS="${SECTIONS:-disks domain}"
SIZES="${SIZES:-1G 16G}"
RUNS="${RUNS:-5}"
DOMAIN_RUNS="${DOMAIN_RUNS:-3}"
DOMAIN_SIZES="${DOMAIN_SIZES:-64M 8G}"
DOMAIN_DATA_PCT="${DOMAIN_DATA_PCT:-6}"
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

has() { [[ " $SECTIONS " == *" $1 "* ]]; }
if has domain; then
    command -v virsh >/dev/null || die "domain section: missing virsh (scripts/lib.sh installs libvirt)"
    "$REPO/scripts/build-tiny-vm.sh" "$REPO/.vm" >&2 || die "building the tiny VM failed"
    if ! virsh -q -c qemu:///system version >/dev/null 2>&1; then
        say "starting virtlogd and libvirtd"
        virtlogd -d; libvirtd -d
        for _ in $(seq 100); do virsh -q -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
    fi
fi
VIRSH=(virsh -q -c qemu:///system)
NET=vdrep-bench-net

rm -rf "$BENCH_ROOT"
mkdir -p "$BENCH_ROOT"/{ka,kb,vm,store,run} "$REPO/bench-results"
export VDREP_RUN_DIR="$BENCH_ROOT/run"
VM="$BENCH_ROOT/vm"
STORE="$BENCH_ROOT/store"
RECV_PID=""
DOMAINS=()
cleanup() {
    "$VDREP" failover fovm --cleanup --store "$STORE" >/dev/null 2>&1 || true
    for d in "${DOMAINS[@]}"; do
        "$VDREP" failover "$d" --cleanup --domain "$d" --store "$STORE" >/dev/null 2>&1 || true
        "$VDREP" failover "$d" --cancel --domain "$d" --store "$STORE" >/dev/null 2>&1 \
            || "$VDREP" failover "$d" --cancel --store "$STORE" >/dev/null 2>&1 || true
        "${VIRSH[@]}" destroy "$d" >/dev/null 2>&1 || true
        "${VIRSH[@]}" undefine "$d" >/dev/null 2>&1 || true
    done
    if [[ ${#DOMAINS[@]} -gt 0 ]]; then
        "${VIRSH[@]}" net-destroy "$NET" >/dev/null 2>&1 || true
        "${VIRSH[@]}" net-undefine "$NET" >/dev/null 2>&1 || true
    fi
    "$VDREP" umount "$VM" >/dev/null 2>&1 || "$VDREP" umount --lazy "$VM" >/dev/null 2>&1 || true
    [[ -n "$RECV_PID" ]] && kill "$RECV_PID" 2>/dev/null || true
}
trap cleanup EXIT

"$VDREP" keys init --name site-a --out "$BENCH_ROOT/ka" >/dev/null
"$VDREP" keys init --name site-b --out "$BENCH_ROOT/kb" >/dev/null
"$VDREP" mount "$VM" --keys "$BENCH_ROOT/ka" >&2
"$VDREP" receive --listen 127.0.0.1:0 --store "$STORE" --keys "$BENCH_ROOT/kb" \
    --trust "$BENCH_ROOT/ka/site-a.crt" > "$BENCH_ROOT/recv.out" 2> "$BENCH_ROOT/recv.log" &
RECV_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$BENCH_ROOT/recv.out" 2>/dev/null && break; sleep 0.1; done
ADDR="$(awk '/listening on/ {print $3; exit}' "$BENCH_ROOT/recv.out")"
[[ -n "$ADDR" ]] || die "receiver did not start (see $BENCH_ROOT/recv.log)"

now() { date +%s.%N; }
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v)*1000:.1f} ms (min {min(v)*1000:.1f}, max {max(v)*1000:.1f})")' "$@"; }
REPORT=()

bench_disks() {
    local DISKS=() s f bytes k t0 FIRST v
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
    say "protecting ${DISKS[*]} -> $ADDR"
    "$VDREP" protect fovm --to "$ADDR" --trust "$BENCH_ROOT/kb/site-b.crt" --every 1h "${DISKS[@]}" >&2
    t0="$(now)"
    "$VDREP" sync "$VM" --timeout 1800 >&2
    say "initial replication took $(python3 -c "print(round($(now) - $t0, 1))") s"
    FIRST="$("$VDREP" points fovm --store "$STORE" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["points"][0]["cycle"])')"

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

    declare -A RES
    for s in $SIZES; do
        v=()
        for _ in $(seq "$RUNS"); do v+=("$(expose_once latest "$s")"); done
        RES["$s"]="$(median "${v[@]}")"
        say "latest point, $s disk: ${RES[$s]}"
    done

    say "making $CYCLES more points (a sync each)"
    local first_size="${SIZES%% *}" i args OLD NPTS
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

    REPORT+=("## Test failover: time to a readable VHD" ""
        "\`vdrep failover --test\` → \`qemu-img info -f vpc\` succeeds, median of $RUNS."
        "" "| case | time |" "|---|---|")
    for s in $SIZES; do REPORT+=("| newest point, $s sparse disk | ${RES[$s]} |"); done
    REPORT+=("| point $CYCLES cycles old ($first_size disk, $NPTS points kept) | $OLD |" "")
}

# The tiny VM as a libvirt domain NAME on raw disk FILE, idle (it runs
# until shut down; the guest agent answers), NIC on $NET. A fixed UUID: the
# point's definition (which an unplanned failover defines) names it, so
# defining the primary's again after a cancel must keep it.
domain_xml() { # NAME FILE UUID
    cat <<XML
<domain type='qemu'><name>$1</name><uuid>$3</uuid><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>$REPO/.vm/vmlinuz</kernel>
  <initrd>$REPO/.vm/initramfs.cpio.gz</initrd><cmdline>console=ttyS0 panic=-1 vdrep.mode=idle</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$2'/><target dev='vda' bus='virtio'/></disk>
    <interface type='network'><source network='$NET'/><model type='virtio'/></interface>
    <serial type='file'><source path='$BENCH_ROOT/$1-console.log'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/></devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
XML
}

# Seconds until domain NAME's guest agent answers guest-ping (polled every
# 100 ms, up to 600 s).
until_ping() { # NAME T0 -> seconds since T0
    local t
    for _ in $(seq 6000); do
        if "${VIRSH[@]}" qemu-agent-command "$1" '{"execute":"guest-ping"}' --timeout 1 >/dev/null 2>&1; then
            t="$(now)"; python3 -c "print(f'{$t - $2:.4f}')"; return 0
        fi
        sleep 0.1
    done
    die "domain $1: no guest-ping answer within 600 s"
}

# One domain failover: run CMD... (a vdrep failover with --json), then wait
# for guest-ping on domain PINGED. Prints: wall-s own-ms guest-s steps-json.
domain_run() { # PINGED CMD...
    local pinged="$1" t0 t1 out own steps g
    shift
    t0="$(now)"
    out="$("$@" 2>"$BENCH_ROOT/cmd.err")" || die "$* failed: $(cat "$BENCH_ROOT/cmd.err")"
    t1="$(now)"
    g="$(until_ping "$pinged" "$t1")"
    own="$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["timing"]["total_ms"])')"
    steps="$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.dumps({s["step"]: s["ms"] for s in json.load(sys.stdin)["timing"]["steps"]}))')"
    printf '%s %s %s %s\n' "$(python3 -c "print(f'{$t1 - $t0:.4f}')")" "$own" "$g" "$steps"
}

# Medians of runs (lines of domain_run) as a table row.
domain_row() { # LABEL FILE
    python3 - "$1" "$2" <<'PY'
import json, statistics, sys
label, f = sys.argv[1], sys.argv[2]
rows = [l.split(" ", 3) for l in open(f).read().splitlines() if l.strip()]
wall = [float(r[0]) for r in rows]
own = [float(r[1]) / 1000 for r in rows]
guest = [float(r[2]) for r in rows]
steps = [json.loads(r[3]) for r in rows]
med = statistics.median
names = list(steps[0])
per = ", ".join(f"{n} {med([s.get(n, 0) for s in steps]):.0f}" for n in names)
share = med(wall)
print(f"| {label} | {share:.3f} s (max {max(wall):.3f}) | {med(own):.3f} s | {med(guest):.2f} s | {med([w + g for w, g in zip(wall, guest)]):.2f} s | {per} | {'PASS' if max(wall) < 1 else 'MISS'} |")
PY
}

# The binaries each domain run is timed with: $VDREP, and first
# $BASE_VDREP (a baseline build, e.g. of main) if set, alternating run by
# run so both see the same host load.
DOMAIN_BINS=("$VDREP")
[[ -n "${BASE_VDREP:-}" ]] && DOMAIN_BINS=("$BASE_VDREP" "$VDREP")
runs_of() { [[ "$1" == "$VDREP" ]] && echo .runs || echo .base.runs; }
# Rows of FILE-PREFIX.runs (and its baseline's, if one ran) into rows.
domain_rows() { # LABEL FILE-PREFIX
    if [[ -s "$2.base.runs" ]]; then
        rows+=("$(domain_row "$1, baseline" "$2.base.runs")")
    fi
    rows+=("$(domain_row "$1" "$2.runs")")
}

bench_domain() {
    local s f bytes k ext name xml t0 b rows=()
    "${VIRSH[@]}" net-destroy "$NET" >/dev/null 2>&1 || true
    "${VIRSH[@]}" net-undefine "$NET" >/dev/null 2>&1 || true
    printf "<network><name>%s</name><bridge stp='off' delay='0'/></network>\n" "$NET" > "$BENCH_ROOT/net.xml"
    "${VIRSH[@]}" net-define "$BENCH_ROOT/net.xml" >/dev/null
    "${VIRSH[@]}" net-start "$NET" >/dev/null
    for s in $DOMAIN_SIZES; do
        name="vdrep-bench-$s"
        f="$VM/os-$s.img"
        DOMAINS+=("$name")
        "${VIRSH[@]}" destroy "$name" >/dev/null 2>&1 || true
        "${VIRSH[@]}" undefine "$name" >/dev/null 2>&1 || true
        truncate -s "$s" "$f"
        bytes="$(stat -c %s "$f")"
        # DOMAIN_DATA_PCT % of the disk written, in 8 extents spread over it.
        ext=$(( bytes * DOMAIN_DATA_PCT / 100 / 8 / 65536 * 64 ))
        for k in $(seq 0 7); do
            qemu-io -f raw -c "write -P 0x$((k + 33)) $((bytes / 8 * k)) ${ext}k" "$f" >/dev/null
        done
        xml="$BENCH_ROOT/$name.xml"
        domain_xml "$name" "$f" "$(python3 -c 'import uuid; print(uuid.uuid4())')" > "$xml"
        "${VIRSH[@]}" define "$xml" >/dev/null
        "$VDREP" protect --domain "$name" --to "$ADDR" --trust "$BENCH_ROOT/kb/site-b.crt" --every 1h >&2
        t0="$(now)"
        "$VDREP" sync "$VM" --timeout 3600 >/dev/null
        say "$name: $s disk, $((ext * 8 / 1024)) MiB written, replicated in $(python3 -c "print(round($(now) - $t0, 1))") s"

        : > "$BENCH_ROOT/test-$s.runs"
        : > "$BENCH_ROOT/test-$s.base.runs"
        for _ in $(seq "$DOMAIN_RUNS"); do
            for b in "${DOMAIN_BINS[@]}"; do
                domain_run "$name-test" "$b" failover "$name" --test --domain "$name" --store "$STORE" --json >> "$BENCH_ROOT/test-$s$(runs_of "$b")"
                "$VDREP" failover "$name" --cleanup --domain "$name" --store "$STORE" >/dev/null
                say "$name --test ($b): $(tail -1 "$BENCH_ROOT/test-$s$(runs_of "$b")")"
            done
        done
        domain_rows "\`--test\`, $s disk ($((ext * 8 / 1024)) MiB data)" "$BENCH_ROOT/test-$s"

        : > "$BENCH_ROOT/unplanned-$s.runs"
        : > "$BENCH_ROOT/unplanned-$s.base.runs"
        for _ in $(seq "$DOMAIN_RUNS"); do
            for b in "${DOMAIN_BINS[@]}"; do
                domain_run "$name" "$b" failover "$name" --unplanned --domain "$name" --store "$STORE" --json >> "$BENCH_ROOT/unplanned-$s$(runs_of "$b")"
                "$VDREP" failover "$name" --cancel --domain "$name" --store "$STORE" >/dev/null
                # The same libvirtd is both sites: the primary's definition back.
                "${VIRSH[@]}" define "$xml" >/dev/null
                say "$name --unplanned ($b): $(tail -1 "$BENCH_ROOT/unplanned-$s$(runs_of "$b")")"
            done
        done
        domain_rows "\`--unplanned\`, $s disk ($((ext * 8 / 1024)) MiB data)" "$BENCH_ROOT/unplanned-$s"
    done
    REPORT+=("## Domain failover: time to guest-agent ready" ""
        "A libvirt domain running the tiny VM (TCG, 1 vCPU, direct kernel boot, idle mode), one raw disk. vdrep's share: the failover command's run (wall clock; its own \`timing\` from its --json alongside), ending when \`virsh start\` returned; the guest's share: from there to the first \`guest-ping\` answer (polled every 100 ms). Median of $DOMAIN_RUNS; step times in ms. Target: vdrep's share < 1 s at every size (PASS/MISS on the slowest run)."
        ""
        "| case | vdrep's share (wall) | vdrep's own timing | guest's share | total | steps (ms, median) | < 1 s |"
        "|---|---|---|---|---|---|---|"
        "${rows[@]}" "")
}

for sec in $SECTIONS; do
    case "$sec" in
        disks) bench_disks ;;
        domain) bench_domain ;;
        *) die "unknown section $sec (disks, domain)" ;;
    esac
done

{
    echo "# Failover speed ($STAMP)"
    echo
    echo "Release build, git $(cd "$REPO" && git rev-parse --short HEAD), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    printf '%s\n' "${REPORT[@]}"
} | tee "$OUT"
say "written $OUT"
