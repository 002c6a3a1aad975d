#!/usr/bin/env bash
# vdrep demo, on one machine ("site A" and "site B" are two folders):
#
#   scripts/demo.sh
#
#  1. installs prerequisites (root + apt; NO_INSTALL=1 only checks them) and
#     stops with the list of what is missing if anything still is
#  2. builds vdrep (release) and the tiny test VM
#  3. a key pair per site; `vdrep receive` at site B (127.0.0.1, mutual TLS)
#  4. site A: a 256 MiB fixed VHD, `vdrep mount --keys` over its folder
#  5. `vdrep protect vm1 --every continuous`: initial copy over QUIC
#  6. the VM writes a proof file through the mount; `vdrep sync`
#  7. more writes (a second proof file); `vdrep sync`
#  8. qemu-img compare site A vs the site-B replica
#  9. `vdrep points`; `vdrep failover --test`: the newest point appears as a VHD
#     (FUSE view, no copy); the VM boots from it in check mode; `--cleanup`
# 10. unmount, stop the receiver
#
# Environment: DEMO_DIR (default: a new /var/tmp/vdrep-demo.XXXXXX, kept),
# DISK_MB=256, NO_INSTALL=1, NO_BUILD=1, VDREP=path (binary; default
# target/release/vdrep), VM_QUIET=0 (show the VM console).
# Every step does what it announces or the demo stops with "demo: FAILED" and a
# non-zero exit: the guest writes and the boot of the replica need QEMU and the
# tiny VM, and there is no fallback that skips them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
# The demo replicates to the embedded local store: no S3 engine needed.
export VDREP_SKIP_PREREQS="${VDREP_SKIP_PREREQS:-garage}"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"

VDREP="${VDREP:-$REPO/target/release/vdrep}"
DISK_MB="${DISK_MB:-256}"
DEMO_DIR="${DEMO_DIR:-$(mktemp -d /var/tmp/vdrep-demo.XXXXXX)}"
mkdir -p "$DEMO_DIR"
SITE_A="$DEMO_DIR/site-a"       # the VM disk folder, mounted with vdrep
SITE_B="$DEMO_DIR/site-b"       # the replica folder
DISK_NAME="vm1.vhd"
TAG1="demo-1-$(date +%s)"
TAG2="demo-2-$(date +%s)"
STEP=0
export VM_QUIET="${VM_QUIET:-1}"   # vm-run.sh: summary lines only (VM_QUIET=0 shows the serial console)

step() { STEP=$((STEP + 1)); printf '\n\033[1m== step %d: %s\033[0m\n' "$STEP" "$*"; }
info() { printf '   %s\n' "$*"; }
run()  { printf '   $'; printf ' %q' "$@"; printf '\n'; "$@"; }
die()  { printf '\n\033[31mdemo: FAILED at step %d: %s\033[0m\n' "$STEP" "$*" >&2; exit 1; }

is_mounted() { [[ "$(findmnt -n -o FSTYPE --mountpoint "$1" 2>/dev/null | tail -1)" == fuse* ]]; }
RECV_PID=""
cleanup() {
    [[ -n "$RECV_PID" ]] && kill "$RECV_PID" 2>/dev/null || true
    if is_mounted "$SITE_A"; then
        info "cleanup: unmounting $SITE_A"
        "$VDREP" umount "$SITE_A" 2>/dev/null || fusermount3 -u "$SITE_A" 2>/dev/null || umount -l "$SITE_A" || true
    fi
}
trap cleanup EXIT

# --- site-A side ------------------------------------------------------------
guest_write() { # TAG
    run scripts/vm-run.sh "$SITE_A/$DISK_NAME" write "$1" vpc none || die "the VM could not write its proof file (tag $1)"
}

# =============================================================================
step "prerequisites"
if [[ "${NO_INSTALL:-0}" != 1 && -n "$(vdrep_missing_prereqs)" ]]; then
    info "installing: ${VDREP_APT_PACKAGES[*]} ${VDREP_QEMU_PACKAGES[*]}"
    vdrep_install_prereqs || die "prerequisites missing after the install: $(vdrep_missing_prereqs | tr '\n' ' ')(see above)"
fi
if [[ -z "${CARGO_HOME:-}" ]] && ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
if ! vdrep_prereq_report >"$DEMO_DIR/prereqs.txt"; then
    cat "$DEMO_DIR/prereqs.txt"
    die "prerequisites missing: $(vdrep_missing_prereqs | tr '\n' ' ')(run scripts/demo.sh as root without NO_INSTALL, or install them)"
fi
info "all prerequisites present ($(wc -l <"$DEMO_DIR/prereqs.txt") checked: scripts/check-prereqs.sh lists them)"

step "build vdrep (release) and the tiny test VM"
if [[ "${NO_BUILD:-0}" != 1 ]]; then run cargo build --release -q || die "cargo build --release failed"; fi
[[ -x "$VDREP" ]] || die "no $VDREP (build it with cargo build --release)"
run scripts/build-tiny-vm.sh || die "building the tiny test VM failed (see above)"
info "guest: the tiny VM (ext2 file system + proof file), booted under QEMU"

step "identities: one key pair per site (mutual TLS, pinned certificates)"
mkdir -p "$SITE_A" "$SITE_B" "$DEMO_DIR/keys-a" "$DEMO_DIR/keys-b"
info "demo folder: $DEMO_DIR"
run "$VDREP" keys init --name site-a --out "$DEMO_DIR/keys-a" >/dev/null
run "$VDREP" keys init --name site-b --out "$DEMO_DIR/keys-b" >/dev/null

step "site B: start the receiver on 127.0.0.1 (replica store in $SITE_B)"
RECV_LOG="$DEMO_DIR/receiver.log"
"$VDREP" receive --listen 127.0.0.1:0 --store "$SITE_B" --keys "$DEMO_DIR/keys-b" \
    --trust "$DEMO_DIR/keys-a/site-a.crt" >"$DEMO_DIR/receiver.out" 2>"$RECV_LOG" &
RECV_PID=$!
for _ in $(seq 50); do grep -q '^listening on' "$DEMO_DIR/receiver.out" 2>/dev/null && break; sleep 0.1; done
RECV_ADDR="$(sed -n 's/^listening on \([^ ]*\).*/\1/p' "$DEMO_DIR/receiver.out")"
[[ -n "$RECV_ADDR" ]] || die "the receiver did not start (see $RECV_LOG)"
info "receiver listening on $RECV_ADDR (pid $RECV_PID)"

step "site A: a ${DISK_MB} MiB fixed VHD, then vdrep mount over its folder"
run qemu-img create -q -f vpc -o subformat=fixed "$SITE_A/$DISK_NAME" "${DISK_MB}M"
run "$VDREP" mount "$SITE_A" --keys "$DEMO_DIR/keys-a" || die "vdrep mount failed"
is_mounted "$SITE_A" || die "vdrep mount returned but $SITE_A is not a FUSE mount"
info "mounted: $(findmnt -n -o SOURCE,FSTYPE --mountpoint "$SITE_A" | tail -1)"

step "protect the VM: continuous replication to site B (initial copy starts now)"
run "$VDREP" protect vm1 --to "$RECV_ADDR" --trust "$DEMO_DIR/keys-b/site-b.crt" \
    --every continuous "$SITE_A/$DISK_NAME" || die "vdrep protect failed"

step "the guest writes a proof file (tag $TAG1) while replication runs"
guest_write "$TAG1"

step "vdrep sync: cut now and wait until site B has durably applied it"
run "$VDREP" sync vm1 || die "vdrep sync failed"
run "$VDREP" status "$SITE_A"

step "more guest writes (tag $TAG2), then sync again"
guest_write "$TAG2"
run "$VDREP" sync vm1 || die "vdrep sync failed"

REPLICA="$(find "$SITE_B/sites/site-a/vms/vm1/disks" -name "$DISK_NAME" | head -1)"
[[ -n "$REPLICA" ]] || die "no replica of $DISK_NAME in $SITE_B"
step "compare site A with the site-B replica"
info "replica: $REPLICA"
run qemu-img compare -f vpc -F vpc "$SITE_A/$DISK_NAME" "$REPLICA" || die "replica differs from the source"
info "recovery points at site B: $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["points"]))' "$(dirname "$(dirname "$(dirname "$REPLICA")")")/points.json")"

step "site B: the recovery points of vm1"
run "$VDREP" points vm1 --store "$SITE_B" || die "vdrep points failed"

step "test failover at site B: expose the newest point as a VHD (no copy), boot the VM from it"
T0="$(date +%s%N)"
"$VDREP" failover vm1 --test --point latest --store "$SITE_B" --json >"$DEMO_DIR/failover.json" \
    || die "vdrep failover --test failed"
info "exposed in $(( ($(date +%s%N) - T0) / 1000000 )) ms"
EXPOSED="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["disks"][0]["path"])' "$DEMO_DIR/failover.json")"
info "exposed disk: $EXPOSED"
BEFORE="$(sha256sum "$REPLICA" | cut -d' ' -f1)"
run scripts/vm-run.sh "$EXPOSED" check "$TAG2" vpc none || die "the VM did not boot from the exposed point, or did not find proof file $TAG2"
run "$VDREP" failover vm1 --cleanup --store "$SITE_B" || die "vdrep failover --cleanup failed"
[[ "$(sha256sum "$REPLICA" | cut -d' ' -f1)" == "$BEFORE" ]] || die "the test failover changed the replica"
info "the replica is unchanged by the test VM (copy-on-write overlay, removed by --cleanup)"

step "unmount site A"
run "$VDREP" umount "$SITE_A" || die "vdrep umount failed"
is_mounted "$SITE_A" && die "$SITE_A still mounted"

printf '\n\033[32mdemo: OK\033[0m  (files kept in %s)\n' "$DEMO_DIR"
