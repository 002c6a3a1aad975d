#!/usr/bin/env bash
# vdrep demo, on one machine ("site A" and "site B" are two folders):
#
#   scripts/demo.sh
#
#  1. installs prerequisites (root + apt; NO_INSTALL=1 to skip)
#  2. builds vdrep (release) and the tiny test VM
#  3. site A: a 256 MiB fixed VHD, `vdrep mount` over its folder
#  4. initial cut, then a base copy of the disk to site B (no writes in flight)
#  5. the VM writes a proof file through the mount; cut
#  6. more writes (a second proof file); cut
#  7. "replication": the sealed .hrl logs are applied to the site-B copy with
#     `vdrep hrl apply` (QUIC transport is not implemented yet: this is the
#     step that `vdrep protect/receive/sync` will replace)
#  8. qemu-img compare site A vs site B
#  9. "failover": boot the VM from the site-B replica in check mode
# 10. unmount
#
# Environment: DEMO_DIR (default: a new /var/tmp/vdrep-demo.XXXXXX, kept),
# DISK_MB=256, NO_INSTALL=1, NO_BUILD=1, NO_VM=1 (use qemu-io writes instead of the VM),
# VDREP=path (binary; default target/release/vdrep), VM_QUIET=0 (show the VM console).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"

VDREP="${VDREP:-$REPO/target/release/vdrep}"
DISK_MB="${DISK_MB:-256}"
DEMO_DIR="${DEMO_DIR:-$(mktemp -d /var/tmp/vdrep-demo.XXXXXX)}"
SITE_A="$DEMO_DIR/site-a"       # the VM disk folder, mounted with vdrep
SITE_B="$DEMO_DIR/site-b"       # the replica folder
DISK_NAME="vm1.vhd"
TAG1="demo-1-$(date +%s)"
TAG2="demo-2-$(date +%s)"
USE_VM=1
STEP=0
export VM_QUIET="${VM_QUIET:-1}"   # vm-run.sh: summary lines only (VM_QUIET=0 shows the serial console)

step() { STEP=$((STEP + 1)); printf '\n\033[1m== step %d: %s\033[0m\n' "$STEP" "$*"; }
info() { printf '   %s\n' "$*"; }
run()  { printf '   $'; printf ' %q' "$@"; printf '\n'; "$@"; }
die()  { printf '\n\033[31mdemo: FAILED at step %d: %s\033[0m\n' "$STEP" "$*" >&2; exit 1; }

is_mounted() { [[ "$(findmnt -n -o FSTYPE --mountpoint "$1" 2>/dev/null | tail -1)" == fuse* ]]; }
cleanup() {
    if is_mounted "$SITE_A"; then
        info "cleanup: unmounting $SITE_A"
        "$VDREP" umount "$SITE_A" 2>/dev/null || fusermount3 -u "$SITE_A" 2>/dev/null || umount -l "$SITE_A" || true
    fi
}
trap cleanup EXIT

# --- site-A side ------------------------------------------------------------
# Seal a cycle: `cut_cycle ARRAY` stores the sealed log paths in ARRAY.
cut_cycle() {
    local -n logs_out="$1"
    local out p
    logs_out=()
    printf '   $ %s cut %s\n' "$VDREP" "$SITE_A"
    out="$("$VDREP" cut "$SITE_A")" || die "vdrep cut failed"
    while IFS= read -r p; do
        [[ -n "$p" ]] || continue
        [[ "$p" == /* || -e "$p" ]] || p="$SITE_A/$p"
        logs_out+=("$p")
    done <<<"$out"
}

guest_write() { # TAG PATTERN OFFSET LEN
    if [[ "$USE_VM" == 1 ]]; then
        run scripts/vm-run.sh "$SITE_A/$DISK_NAME" write "$1" vpc none || die "VM write failed"
    else
        run qemu-io -f vpc -c "write -P $2 $3 $4" "$SITE_A/$DISK_NAME" || die "qemu-io write failed"
    fi
}

# --- transport: today a local copy of sealed logs; later QUIC -------------
# Ship the sealed logs of one cycle to site B. Replace with
# `vdrep sync`/`vdrep receive` when the QUIC transport lands.
ship_logs() { # LOG...
    mkdir -p "$SITE_B/incoming"
    local l
    for l in "$@"; do run cp "$l" "$SITE_B/incoming/"; done
}

# --- site-B side ------------------------------------------------------------
apply_logs() { # LOG... (basenames in $SITE_B/incoming), in cut order
    local l
    for l in "$@"; do
        run "$VDREP" hrl apply "$SITE_B/incoming/$(basename "$l")" "$SITE_B/$DISK_NAME" \
            || die "vdrep hrl apply $(basename "$l") failed"
    done
}

# =============================================================================
step "prerequisites"
if [[ "${NO_INSTALL:-0}" != 1 && -n "$(vdrep_missing_prereqs)" ]]; then
    info "installing: ${VDREP_APT_PACKAGES[*]}"
    vdrep_install_prereqs || die "cannot install prerequisites (run as root, or NO_INSTALL=1)"
else
    info "prerequisites present (missing: $(vdrep_missing_prereqs | tr '\n' ' ' || true))"
fi
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"

step "build vdrep (release) and the tiny test VM"
if [[ "${NO_BUILD:-0}" != 1 ]]; then run cargo build --release -q || die "cargo build --release failed"; fi
[[ -x "$VDREP" ]] || die "no $VDREP"
if [[ "${NO_VM:-0}" == 1 ]] || ! command -v qemu-system-x86_64 >/dev/null; then
    USE_VM=0
elif ! scripts/build-tiny-vm.sh; then
    info "tiny VM build failed: falling back to qemu-io writes"
    USE_VM=0
fi
info "guest writes via: $([[ $USE_VM == 1 ]] && echo "the tiny VM (ext2 file system + proof file)" || echo "qemu-io")"

step "site A: a ${DISK_MB} MiB fixed VHD, then vdrep mount over its folder"
mkdir -p "$SITE_A" "$SITE_B"
info "demo folder: $DEMO_DIR"
run qemu-img create -q -f vpc -o subformat=fixed "$SITE_A/$DISK_NAME" "${DISK_MB}M"
run "$VDREP" mount "$SITE_A" || die "vdrep mount failed"
is_mounted "$SITE_A" || die "vdrep mount returned but $SITE_A is not a FUSE mount"
info "mounted: $(findmnt -n -o SOURCE,FSTYPE --mountpoint "$SITE_A" | tail -1)"

step "initial cut, then a base copy to site B (initial replication)"
cut_cycle LOGS0
info "cut 0 sealed ${#LOGS0[@]} log(s): ${LOGS0[*]:-none}"
run cp --sparse=always "$SITE_A/$DISK_NAME" "$SITE_B/$DISK_NAME"

step "guest writes (tag $TAG1), then cut 1"
guest_write "$TAG1" 0x5a 1M 64k
cut_cycle LOGS1
info "cut 1 sealed ${#LOGS1[@]} log(s): ${LOGS1[*]:-none}"
[[ ${#LOGS1[@]} -gt 0 ]] || die "cut 1 printed no logs"

step "more guest writes (tag $TAG2), then cut 2"
guest_write "$TAG2" 0xa5 8M 128k
cut_cycle LOGS2
info "cut 2 sealed ${#LOGS2[@]} log(s): ${LOGS2[*]:-none}"
[[ ${#LOGS2[@]} -gt 0 ]] || die "cut 2 printed no logs"

step "replicate: ship the sealed logs to site B and apply them (QUIC transport: not yet implemented)"
ship_logs "${LOGS1[@]}" "${LOGS2[@]}"
apply_logs "${LOGS1[@]}" "${LOGS2[@]}"

step "compare site A with the site-B replica"
run qemu-img compare -f vpc -F vpc "$SITE_A/$DISK_NAME" "$SITE_B/$DISK_NAME" || die "replica differs from the source"

step "failover: start the VM from the site-B replica (test failover; orchestration not yet implemented)"
if [[ "$USE_VM" == 1 ]]; then
    run scripts/vm-run.sh "$SITE_B/$DISK_NAME" check "$TAG2" vpc none || die "replica did not boot/check"
else
    run qemu-io -f vpc -r -c "read -P 0x5a 1M 64k" -c "read -P 0xa5 8M 128k" "$SITE_B/$DISK_NAME" || die "replica data check failed"
fi

step "unmount site A"
run "$VDREP" umount "$SITE_A" || die "vdrep umount failed"
is_mounted "$SITE_A" && die "$SITE_A still mounted"

printf '\n\033[32mdemo: OK\033[0m  (files kept in %s)\n' "$DEMO_DIR"
