#!/usr/bin/env bash
# Boot the tiny test VM on a disk image and wait for its verdict.
#
#   scripts/vm-run.sh DISK MODE TAG [FORMAT] [CACHE]
#
#   MODE    write | check | stress
#   TAG     string written into / expected in the guest's proof file
#           (no spaces; use "-" for none, e.g. for stress)
#   FORMAT  vpc (default) | raw | qcow2 ...  (qemu -drive format=)
#   CACHE   none (default) | writeback | writethrough | directsync | unsafe
#
# Environment:
#   VM_TIMEOUT=120        seconds before the VM is killed (exit 124)
#   VM_DIR=<repo>/.vm     kernel + initramfs (built on demand by build-tiny-vm.sh)
#   VM_LOG=path           serial log file (default: a mktemp file, path printed)
#   VM_MEM=256            guest memory in MiB
#   VM_COUNT=256          stress mode: number of random 4 KiB writes
#   VM_STAMPS=0           write mode: N stamped 4 KiB writes (each flushed)
#                         into the disk's second half after the proof file
#   VM_LOCKING=auto       qemu file.locking (auto|on|off)
#   VM_QUIET=1            do not echo the serial console to stdout
#   VM_ACCEL=auto         auto | kvm | tcg. auto boots a 20 s probe guest with
#                         KVM once (result cached in VM_DIR) and uses
#                         "-accel kvm -accel tcg" only if KVM really works;
#                         otherwise TCG (nested/broken /dev/kvm can hang).
#
# Exit status: 0 iff the expected marker line appeared
#   write  -> "VDREP-GUEST: WROTE <sha256>"
#   check  -> "VDREP-GUEST: CHECK OK <sha256>"
#   stress -> "VDREP-GUEST: STRESS DONE ..."
# 1 if the guest reported a failure / no marker, 2 on usage errors, 124 on timeout.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 3 && $# -le 5 ]] || usage

DISK="$1"; MODE="$2"; TAG="$3"; FORMAT="${4:-vpc}"; CACHE="${5:-none}"
VM_TIMEOUT="${VM_TIMEOUT:-120}"
VM_DIR="${VM_DIR:-$REPO/.vm}"
VM_MEM="${VM_MEM:-256}"
VM_COUNT="${VM_COUNT:-256}"
VM_STAMPS="${VM_STAMPS:-0}"
VM_LOCKING="${VM_LOCKING:-auto}"
VM_QUIET="${VM_QUIET:-0}"
VM_ACCEL="${VM_ACCEL:-auto}"

case "$MODE" in
    write)  EXPECT='VDREP-GUEST: WROTE [0-9a-f]{64}' ;;
    check)  EXPECT='VDREP-GUEST: CHECK OK [0-9a-f]{64}' ;;
    stress) EXPECT='VDREP-GUEST: STRESS DONE ' ;;
    *) echo "vm-run: unknown MODE '$MODE' (write|check|stress)" >&2; exit 2 ;;
esac
[[ "$TAG" =~ ^[A-Za-z0-9._:@+=-]+$ ]] || { echo "vm-run: TAG must be non-empty, no spaces/quotes: '$TAG'" >&2; exit 2; }
[[ "$TAG" == "-" ]] && TAG=""
[[ -e "$DISK" ]] || { echo "vm-run: no such disk: $DISK" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "vm-run: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)" >&2; exit 2; }

if [[ ! -s "$VM_DIR/vmlinuz" || ! -s "$VM_DIR/initramfs.cpio.gz" ]]; then
    echo "vm-run: tiny VM not built in $VM_DIR, building it" >&2
    "$REPO/scripts/build-tiny-vm.sh" "$VM_DIR" >&2
fi

if [[ -n "${VM_LOG:-}" ]]; then
    LOG="$VM_LOG"
    : > "$LOG"
else
    LOG="$(mktemp "${TMPDIR:-/tmp}/vdrep-vm-${MODE}.XXXXXX.log")"
fi

BOOT=(-cpu max -m "$VM_MEM" -nographic -no-reboot -nodefaults -serial stdio
    -kernel "$VM_DIR/vmlinuz" -initrd "$VM_DIR/initramfs.cpio.gz")

# Does KVM actually work here? (/dev/kvm may exist but fail or hang in nested
# setups.) Probe once per host kernel + qemu version and cache the answer.
kvm_works() {
    [[ -r /dev/kvm && -w /dev/kvm ]] || return 1
    local key cache out
    key="$(uname -r)-$(qemu-system-x86_64 --version | head -1 | tr -cd 'A-Za-z0-9.')"
    cache="$VM_DIR/.kvm-probe-$key"
    if [[ ! -f "$cache" ]]; then
        echo "vm-run: probing KVM (once; cached in $cache)" >&2
        out="$(timeout --kill-after=2 20 qemu-system-x86_64 -accel kvm "${BOOT[@]}" \
            -append "console=ttyS0 panic=-1 quiet rdinit=/init vdrep.mode=probe" </dev/null 2>&1 || true)"
        if grep -q 'VDREP-GUEST: PROBE OK' <<<"$out"; then echo kvm > "$cache.tmp.$$"; else echo tcg > "$cache.tmp.$$"; fi
        mv -f "$cache.tmp.$$" "$cache"
    fi
    [[ "$(cat "$cache")" == kvm ]]
}
case "$VM_ACCEL" in
    kvm)  ACCEL_ARGS=(-accel kvm -accel tcg) ;;
    tcg)  ACCEL_ARGS=(-accel tcg) ;;
    auto) if kvm_works; then ACCEL_ARGS=(-accel kvm -accel tcg); else ACCEL_ARGS=(-accel tcg); fi ;;
    *) echo "vm-run: VM_ACCEL must be auto|kvm|tcg" >&2; exit 2 ;;
esac

# Drive: escape commas in the path for qemu's option parser.
DISK_OPT="${DISK//,/,,}"
APPEND="console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init vdrep.mode=$MODE vdrep.count=$VM_COUNT"
[[ -n "$TAG" ]] && APPEND+=" vdrep.tag=$TAG"
[[ "$VM_STAMPS" != 0 ]] && APPEND+=" vdrep.stamps=$VM_STAMPS"

QEMU=(qemu-system-x86_64 "${ACCEL_ARGS[@]}" "${BOOT[@]}"
    -append "$APPEND"
    -drive "file=$DISK_OPT,format=$FORMAT,if=virtio,cache=$CACHE,file.locking=$VM_LOCKING"
)

echo "vm-run: mode=$MODE tag=${TAG:--} disk=$DISK format=$FORMAT cache=$CACHE accel=${ACCEL_ARGS[*]} timeout=${VM_TIMEOUT}s log=$LOG" >&2
START_NS="$(date +%s%N)"
set +e
if [[ "$VM_QUIET" == 1 ]]; then
    timeout --kill-after=5 "$VM_TIMEOUT" "${QEMU[@]}" </dev/null >"$LOG" 2>&1
    RC=$?
else
    timeout --kill-after=5 "$VM_TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | tee "$LOG"
    RC=${PIPESTATUS[0]}
fi
set -e
END_NS="$(date +%s%N)"
SECS="$(awk -v a="$START_NS" -v b="$END_NS" 'BEGIN {printf "%.2f", (b - a) / 1e9}')"

MARK="$(tr -d '\r' < "$LOG" | grep -oE 'VDREP-GUEST: (WROTE|CHECK|STRESS|ERROR).*' | tail -1 || true)"
if tr -d '\r' < "$LOG" | grep -qE "$EXPECT"; then
    echo "vm-run: OK in ${SECS}s: $MARK" >&2
    echo "VM_BOOT_SECONDS=$SECS" >&2
    exit 0
fi
if [[ "$RC" == 124 || "$RC" == 137 ]]; then
    echo "vm-run: TIMEOUT after ${VM_TIMEOUT}s (log: $LOG)" >&2
    exit 124
fi
echo "vm-run: FAILED in ${SECS}s (qemu exit $RC): ${MARK:-no marker line} (log: $LOG)" >&2
exit 1
