#!/usr/bin/env bash
# Build a tiny test VM (kernel + busybox initramfs) from Debian packages only.
#
#   scripts/build-tiny-vm.sh [OUTDIR]      (default: <repo>/.vm)
#
# Produces OUTDIR/vmlinuz and OUTDIR/initramfs.cpio.gz. The guest's /init reads
# vdrep.mode=write|check|stress|appwrite (and vdrep.tag=STRING) from the kernel
# command line, works on /dev/vda (virtio-blk), prints "VDREP-GUEST: ..." marker
# lines on the serial console and powers off. write on a disk written before
# prints "PREVIOUS TAG T" (the tag already on it) before writing its own; with
# vdrep.stamps=N it then makes N stamped, flushed 4 KiB writes into the disk's
# second half (the file system takes the first). See scripts/vm-run.sh to boot it.
# Every mode runs the QEMU guest agent (Debian's qemu-guest-agent binary with
# the host's libraries) when the org.qemu.guest_agent.0 virtio-serial port
# exists (vdrep.agent=0: not), and powers off cleanly on the ACPI power button
# (busybox acpid on the button's evdev device) or the agent's guest-shutdown.
# idle waits for one of them (a VM that runs until it is shut down).
#
# Needs: apt-get (with working sources), dpkg-deb, busybox-static, cpio, gzip,
# kmod (depmod). Idempotent: does nothing if OUTDIR is complete and current.
# Set FORCE=1 to rebuild.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-$REPO/.vm}"
FORCE="${FORCE:-0}"
# Bump when the initramfs content/layout changes, so caches get rebuilt.
INIT_VERSION=10

log() { printf '[build-tiny-vm] %s\n' "$*" >&2; }
die() { printf '[build-tiny-vm] ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
STAMP="$OUTDIR/.complete"
SELF_HASH="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

if [[ "$FORCE" != 1 && -f "$STAMP" && -s "$OUTDIR/vmlinuz" && -s "$OUTDIR/initramfs.cpio.gz" ]] \
   && grep -qx "script=$SELF_HASH" "$STAMP" && grep -qx "init=$INIT_VERSION" "$STAMP"; then
    log "up to date: $OUTDIR ($(grep '^kernel=' "$STAMP"))"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip depmod; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x "/sbin/$tool" ]] \
        || die "missing '$tool' (apt-get install dpkg cpio gzip kmod)"
done
DEPMOD="$(command -v depmod || echo /sbin/depmod)"

BUSYBOX=""
for cand in /bin/busybox /usr/bin/busybox; do
    # busybox-static ships a static /bin/busybox; reject a dynamic one.
    if [[ -x "$cand" ]] && ! ldd "$cand" >/dev/null 2>&1; then BUSYBOX="$cand"; break; fi
done
[[ -n "$BUSYBOX" ]] || die "no static busybox found (apt-get install busybox-static)"

WORK="$OUTDIR/work"
CACHE="$OUTDIR/cache"
mkdir -p "$WORK" "$CACHE"

# 1. Kernel package: resolve the real versioned package behind linux-image-amd64.
KPKG="${KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')}"
[[ -n "$KPKG" ]] || die "cannot resolve linux-image-amd64 (run apt-get update?)"
find_deb() { find "$CACHE" -maxdepth 1 -name "${KPKG}_*.deb" | sort | tail -1; }
DEB="$(find_deb)"
if [[ -z "$DEB" ]]; then
    log "downloading $KPKG"
    if ! (cd "$CACHE" && apt-get download -q "$KPKG" >&2 2>"$CACHE/apt-download.err"); then
        grep -v unsandboxed "$CACHE/apt-download.err" >&2 || true
    fi
    DEB="$(find_deb)"
    [[ -n "$DEB" ]] || die "apt-get download $KPKG failed"
fi
log "kernel package: $(basename "$DEB")"

KROOT="$WORK/kernel"
rm -rf "$KROOT"
mkdir -p "$KROOT"
dpkg-deb -x "$DEB" "$KROOT"
KVER="$(find "$KROOT/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -1)"
[[ -n "$KVER" && -f "$KROOT/boot/vmlinuz-$KVER" ]] || die "no kernel image in $DEB"
MODDIR="$KROOT/lib/modules/$KVER"
[[ -f "$MODDIR/modules.dep" ]] || "$DEPMOD" -b "$KROOT" "$KVER"

# 2. Modules: virtio-blk over PCI, ext4 (also mounts ext2), crc32c for ext4,
# virtio_console for the guest agent's virtio-serial port, button + evdev for
# the ACPI power button as an input device (KEY_POWER) that acpid reads.
WANTED=(virtio_pci virtio_blk crc32c_generic ext4 virtio_console button evdev)
declare -A SEEN=()
ORDER=()
modpath() { # module name -> relative path from modules.dep (or empty if builtin/absent)
    local n="$1" alt="${1//_/-}"
    awk -F: -v a="/$n.ko" -v b="/$alt.ko" '{p=$1; sub(/\.(xz|zst|gz)$/, "", p)}
        (substr(p, length(p)-length(a)+1) == a || substr(p, length(p)-length(b)+1) == b) {print $1; exit}' \
        "$MODDIR/modules.dep"
}
add_mod() { # add a module path and its dependencies, dependencies first
    local rel="$1" dep deps=()
    [[ -n "${SEEN[$rel]:-}" ]] && return 0
    SEEN[$rel]=1
    read -r -a deps < <(awk -F: -v m="$rel" '$1 == m {print $2; exit}' "$MODDIR/modules.dep") || true
    for dep in "${deps[@]}"; do
        add_mod "$dep"
    done
    ORDER+=("$rel")
}
for m in "${WANTED[@]}"; do
    rel="$(modpath "$m")"
    if [[ -z "$rel" ]]; then
        if grep -q "/${m}.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "module $m is built in"
        else
            log "warning: module $m not found in $KVER"
        fi
        continue
    fi
    add_mod "$rel"
done

# 3. Initramfs tree.
ROOT="$WORK/initramfs"
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,mnt,tmp,etc,lib/modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ "$applet" == busybox ]] && continue
    ln -sf busybox "$ROOT/bin/$applet"
done
for s in modprobe insmod poweroff mke2fs acpid; do ln -sf ../bin/busybox "$ROOT/sbin/$s"; done
# A clean power-off, shared by the power button and the agent.
cat > "$ROOT/sbin/vdrep-poweroff" <<'OFF'
#!/bin/sh
echo "VDREP-GUEST: SHUTDOWN $1" > /dev/console
sync
echo "VDREP-GUEST: POWEROFF" > /dev/console
poweroff -f
OFF
# busybox acpid runs /etc/acpi/PWRF/00000080 (its default action for
# KEY_POWER); qemu-ga's guest-shutdown runs /sbin/shutdown -h -P +0 ...
mkdir -p "$ROOT/etc/acpi/PWRF"
printf '#!/bin/sh\nexec /sbin/vdrep-poweroff power-button\n' > "$ROOT/etc/acpi/PWRF/00000080"
printf '#!/bin/sh\nexec /sbin/vdrep-poweroff guest-agent\n' > "$ROOT/sbin/shutdown"
chmod 755 "$ROOT/sbin/vdrep-poweroff" "$ROOT/etc/acpi/PWRF/00000080" "$ROOT/sbin/shutdown"

# QEMU guest agent (vdrep.mode=appwrite: application-consistent points).
# The binary comes from Debian's qemu-guest-agent package; its shared
# libraries are the host's (qemu-system-x86 on the host needs the same set).
find_qga() { find "$CACHE" -maxdepth 1 -name 'qemu-guest-agent_*.deb' | sort | tail -1; }
QGA_DEB="$(find_qga)"
if [[ -z "$QGA_DEB" ]]; then
    log "downloading qemu-guest-agent"
    (cd "$CACHE" && apt-get download -q qemu-guest-agent >&2 2>"$CACHE/apt-download.err") \
        || grep -v unsandboxed "$CACHE/apt-download.err" >&2 || true
    QGA_DEB="$(find_qga)"
    [[ -n "$QGA_DEB" ]] || die "apt-get download qemu-guest-agent failed"
fi
QGA_X="$WORK/qga"
rm -rf "$QGA_X"
dpkg-deb -x "$QGA_DEB" "$QGA_X"
install -D -m 755 "$QGA_X/usr/sbin/qemu-ga" "$ROOT/usr/sbin/qemu-ga"
ldd "$QGA_X/usr/sbin/qemu-ga" | awk '/=> \// {print $3} /^[ \t]*\/lib/ {print $1}' | while read -r lib; do
    [[ -f "$lib" ]] || die "qemu-ga needs $lib, which this host lacks (apt-get install qemu-system-x86)"
    install -D -m 755 "$(readlink -f "$lib")" "$ROOT$lib"
done
mkdir -p "$ROOT/var/run" "$ROOT/run" "$ROOT/lib64"
[[ -e "$ROOT/lib64/ld-linux-x86-64.so.2" ]] || die "ld-linux-x86-64.so.2 not copied for qemu-ga"
log "guest agent: $(basename "$QGA_DEB")"
: > "$ROOT/etc/modules.order"
for rel in "${ORDER[@]}"; do
    src="$MODDIR/$rel"
    base="$(basename "$rel")"
    case "$base" in
        *.ko.xz)  xz -dc "$src" > "$ROOT/lib/modules/${base%.xz}"; base="${base%.xz}" ;;
        *.ko.zst) zstd -qdc "$src" > "$ROOT/lib/modules/${base%.zst}"; base="${base%.zst}" ;;
        *.ko.gz)  gzip -dc "$src" > "$ROOT/lib/modules/${base%.gz}"; base="${base%.gz}" ;;
        *)        cp "$src" "$ROOT/lib/modules/$base" ;;
    esac
    echo "$base" >> "$ROOT/etc/modules.order"
done
log "modules: $(tr '\n' ' ' < "$ROOT/etc/modules.order")"

cat > "$ROOT/init" <<'INIT'
#!/bin/sh
# vdrep tiny test guest. Markers: lines starting with "VDREP-GUEST: ".
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

say() { echo "VDREP-GUEST: $*"; }
finish() { sync; say "POWEROFF"; poweroff -f; sleep 5; }
fail() { say "$*"; finish; }

for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" 2>/dev/null || true
done

MODE=""; TAG=""; COUNT=256; MB=1; STAMPS=0; AGENT=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vdrep.mode=*)  MODE="${arg#vdrep.mode=}" ;;
        vdrep.tag=*)   TAG="${arg#vdrep.tag=}" ;;
        vdrep.count=*) COUNT="${arg#vdrep.count=}" ;;
        vdrep.mb=*)    MB="${arg#vdrep.mb=}" ;;
        vdrep.stamps=*) STAMPS="${arg#vdrep.stamps=}" ;;
        vdrep.agent=*) AGENT="${arg#vdrep.agent=}" ;;
    esac
done
say "BOOTED mode=$MODE tag=$TAG uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r)"

# The ACPI power button (an input device once button + evdev are loaded).
if ls /dev/input/event* >/dev/null 2>&1; then
    # -l: its default log (/var/log/acpid.log) has no folder here.
    acpid -c /etc/acpi -l /tmp/acpid.log && say "ACPID UP"
fi
# The guest agent, if the host gave it its port.
AGENT_PORT=""; AGENT_UP=""
for n in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$n" 2>/dev/null)" = org.qemu.guest_agent.0 ] && AGENT_PORT="/dev/$(basename "$(dirname "$n")")"
done
start_agent() {
    # -d: its exit status says whether it started (its pid file is
    # written by the daemon child, maybe after this returns).
    /usr/sbin/qemu-ga -m virtio-serial -p "$AGENT_PORT" -t /tmp -d -f /var/run/qemu-ga.pid \
        && AGENT_UP=1 && say "AGENT UP $AGENT_PORT"
}
# appwrite starts it once its file system is mounted: a freeze answered
# before the mount froze nothing, and the mount then dirtied the journal
# under a point the host recorded as app-consistent (seen in CI under load).
if [ -n "$AGENT_PORT" ] && [ "$AGENT" != 0 ] && [ "$MODE" != appwrite ]; then
    start_agent
fi

if [ "$MODE" = probe ]; then say "PROBE OK"; finish; fi
if [ "$MODE" = idle ]; then
    # Runs until the power button or the agent powers it off.
    say "IDLE"
    while :; do sleep 3600; done
fi

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || fail "ERROR no /dev/vda (virtio disk not found)"

# Deterministic content: MB MiB of 4 KiB records, each with a header line
# naming the tag and the record number, then pseudo-random hex from a
# Park-Miller generator seeded by the tag. Every 4 KiB block is unique.
gen_proof() {
    seed=$((0x$(printf '%s' "$TAG" | sha256sum | cut -c1-7)))
    awk -v tag="$TAG" -v seed="$seed" -v blocks=$((MB * 256)) 'BEGIN {
        x = seed % 2147483646 + 1
        for (b = 0; b < blocks; b++) {
            printf "%-63s\n", "vdrep-proof tag=" tag " block=" b
            for (k = 0; k < 504; k++) { x = (x * 16807) % 2147483647; printf "%08x", x }
        }
    }'
}

mount_disk() { mount -t ext4 /dev/vda /mnt 2>/dev/null; }

case "$MODE" in
write)
    [ -n "$TAG" ] || fail "ERROR vdrep.tag is empty"
    if mount_disk; then
        say "INFO reusing existing file system on /dev/vda"
        # The data it holds (a failed-over VM shows which point it booted).
        say "PREVIOUS TAG $(cat /mnt/vdrep-proof.tag 2>/dev/null || echo none)"
    else
        say "INFO no file system on /dev/vda, running mke2fs"
        # With stamps, the file system takes the first half of the disk
        # (busybox mke2fs: size in KiB) and the stamps the second.
        FSKIB=""
        [ "$STAMPS" -gt 0 ] && FSKIB=$(( $(cat /sys/block/vda/size) / 4 ))
        mke2fs -q /dev/vda $FSKIB >/dev/null 2>&1 || mke2fs /dev/vda $FSKIB || fail "ERROR mke2fs failed"
        mount_disk || fail "ERROR mount after mke2fs failed"
    fi
    gen_proof > /mnt/vdrep-proof.txt || fail "ERROR writing proof file"
    H=$(sha256sum /mnt/vdrep-proof.txt | cut -d' ' -f1)
    echo "$H" > /mnt/vdrep-proof.sha256
    echo "$TAG" > /mnt/vdrep-proof.tag
    sync
    umount /mnt || fail "ERROR umount failed"
    sync
    if [ "$STAMPS" -gt 0 ]; then
        # vdrep.stamps=N: N stamped 4 KiB writes, one at a time, each
        # flushed (dd conv=fsync), into the second half of the disk. Write n
        # (1..N) goes to block HALF + x_n % HALF, x_n the n-th Park-Miller
        # number from seed 12345, and holds the line "vdrep-stamp tag=T n=N
        # block=B" padded with spaces to 4095 bytes plus a newline, so the
        # host can tell which prefix of the writes any copy holds.
        HALF=$(( $(cat /sys/block/vda/size) / 16 ))
        x=12345; n=0
        say "STAMPS START n=$STAMPS"
        while [ $n -lt "$STAMPS" ]; do
            n=$((n+1)); x=$(( x * 16807 % 2147483647 )); b=$(( HALF + x % HALF ))
            printf '%-4095s\n' "vdrep-stamp tag=$TAG n=$n block=$b" > /tmp/stamp
            dd if=/tmp/stamp of=/dev/vda bs=4096 seek=$b count=1 conv=notrunc,fsync 2>/dev/null \
                || fail "ERROR stamp write $n at block $b failed"
        done
        say "STAMPS DONE n=$n"
    fi
    # Any I/O error the guest's kernel saw (not printed at loglevel=3).
    say "IO ERRORS $(dmesg | grep -ci 'i/o error')"
    say "WROTE $H"
    ;;
check)
    mount -o ro -t ext4 /dev/vda /mnt 2>/dev/null || fail "CHECK FAIL cannot mount /dev/vda"
    if [ ! -f /mnt/vdrep-proof.txt ]; then umount /mnt; fail "CHECK FAIL no /vdrep-proof.txt"; fi
    H=$(sha256sum /mnt/vdrep-proof.txt | cut -d' ' -f1)
    STORED=$(cat /mnt/vdrep-proof.sha256 2>/dev/null)
    FTAG=$(cat /mnt/vdrep-proof.tag 2>/dev/null)
    umount /mnt
    if [ -n "$TAG" ] && [ "$FTAG" != "$TAG" ]; then fail "CHECK FAIL tag mismatch: disk has '$FTAG', expected '$TAG'"; fi
    [ "$H" = "$STORED" ] || fail "CHECK FAIL hash $H != stored $STORED"
    if [ -n "$TAG" ]; then
        # Through a file in the initramfs, not a pipe: busybox awk into a
        # pipe made a check boot take 33 s under TCG instead of 12 s.
        gen_proof > /tmp/expected.txt || fail "ERROR generating the expected proof"
        E=$(sha256sum /tmp/expected.txt | cut -d' ' -f1)
        rm -f /tmp/expected.txt
        [ "$H" = "$E" ] || fail "CHECK FAIL content hash $H != expected $E"
    fi
    say "CHECK OK $H"
    ;;
appwrite)
    # /dev/vda holds an ext4 file system with a journal (made on the host).
    # Start the QEMU guest agent on the org.qemu.guest_agent.0 port, then
    # write files for vdrep.count seconds without syncing, so the host's
    # crash-consistent cuts see a mounted, dirty file system and only the
    # cuts taken under guest-fsfreeze-freeze see a clean one.
    mount -t ext4 /dev/vda /mnt || fail "ERROR cannot mount the ext4 file system on /dev/vda"
    [ -n "$AGENT_PORT" ] || fail "ERROR no org.qemu.guest_agent.0 virtio-serial port"
    start_agent
    [ -n "$AGENT_UP" ] || fail "ERROR qemu-ga did not start"
    end=$(( $(cut -d. -f1 /proc/uptime) + COUNT ))
    n=0
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        n=$((n+1))
        d=/mnt/d$((n % 16))
        mkdir -p "$d"
        head -c 65536 /dev/urandom > "$d/f$((n % 64))"
        echo "$n" > /mnt/last
    done
    # Stop the agent and wait until it is gone: it thaws a file system the
    # host froze when it exits, and a frozen one cannot be unmounted (seen
    # in CI: umount right after `kill` said busy while a host cut had /mnt
    # frozen).
    GA=$(cat /var/run/qemu-ga.pid 2>/dev/null)
    [ -n "$GA" ] && kill "$GA" 2>/dev/null
    i=0
    while [ -n "$GA" ] && [ -d "/proc/$GA" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    i=0
    until umount /mnt; do
        i=$((i+1))
        [ $i -lt 20 ] || fail "ERROR umount failed"
        sleep 0.5
    done
    sync
    say "APPWRITE DONE n=$n"
    ;;
stress)
    # Raw random 4 KiB writes over the whole disk (destroys any file system).
    SECTORS=$(cat /sys/block/vda/size)
    BLOCKS=$((SECTORS / 8))
    [ "$BLOCKS" -gt 0 ] || fail "ERROR empty disk"
    n=0
    while [ $n -lt "$COUNT" ]; do
        off=$(( $(od -An -N4 -tu4 /dev/urandom) % BLOCKS ))
        dd if=/dev/urandom of=/dev/vda bs=4096 seek=$off count=1 conv=notrunc,fsync 2>/dev/null \
            || fail "ERROR dd write at block $off failed"
        n=$((n+1))
    done
    sync
    H=$(sha256sum /dev/vda | cut -d' ' -f1)
    say "STRESS DONE n=$COUNT disk-sha256=$H"
    ;;
*)
    say "ERROR unknown vdrep.mode='$MODE' (write|check|stress|appwrite|idle|probe)"
    ;;
esac
finish
INIT
chmod 755 "$ROOT/init"

# 4. Pack.
log "packing initramfs"
(cd "$ROOT" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -9n > "$OUTDIR/initramfs.cpio.gz.tmp"
mv "$OUTDIR/initramfs.cpio.gz.tmp" "$OUTDIR/initramfs.cpio.gz"
cp "$KROOT/boot/vmlinuz-$KVER" "$OUTDIR/vmlinuz"
rm -rf "$WORK"
printf 'kernel=%s\npackage=%s\nscript=%s\ninit=%s\nmodules=%s\n' "$KVER" "$(basename "$DEB")" \
    "$SELF_HASH" "$INIT_VERSION" "${ORDER[*]##*/}" > "$STAMP"
log "done: $OUTDIR/vmlinuz ($KVER), $OUTDIR/initramfs.cpio.gz ($(du -h "$OUTDIR/initramfs.cpio.gz" | cut -f1))"
