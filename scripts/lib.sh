# shellcheck shell=bash
# Shared helpers for vdrep's scripts (.ci/run, scripts/demo.sh, scripts/test.sh).
# Source it: . "$REPO/scripts/lib.sh"

# Debian packages the tests, the demo, the benchmarks and the tiny VM need,
# apart from QEMU (below), which must come from the suite qemu-utils came from.
VDREP_APT_PACKAGES=(
    fuse3 fio bindfs busybox-static cpio xz-utils zstd kmod strace
    python3 util-linux gzip dpkg apt ca-certificates e2fsprogs
    systemd man-db binutils
    python3-prometheus-client curl
)
# Installed together, from one suite: the suite of an installed qemu-utils
# (bookworm-backports on the Debian 12 images this project runs on), or the
# default suite when qemu-utils is absent.
VDREP_QEMU_PACKAGES=(qemu-system-x86 qemu-utils)
# libvirt (domains protected by name, failover that defines and starts the VM),
# from the same suite as QEMU: libvirt 11.3 of bookworm-backports matches QEMU
# 10. The network driver is named because it is only a recommendation of
# libvirt-daemon (vdrep defines isolated networks for test failovers).
VDREP_LIBVIRT_PACKAGES=(
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-network libvirt-clients
)

# Every prerequisite, one per line: NAME|PACKAGE|HOW
#   HOW = cmd:COMMAND (must be on PATH, or in /sbin, /usr/sbin)
#         static:PATH (a statically linked executable)
#         dev:PATH    (a character device)
#         py:MODULE   (a module Debian's /usr/bin/python3 imports: apt's python
#                      packages serve it, not a python3 of pyenv or a venv)
#         file:PATH   (a file a package installs, such as a libvirt driver)
# `vdrep_prereq_report` prints each with its version or "missing".
VDREP_PREREQS=(
    "cargo|rustup (https://rustup.rs)|cmd:cargo"
    "rustc|rustup (https://rustup.rs)|cmd:rustc"
    "fusermount3|fuse3|cmd:fusermount3"
    "/dev/fuse|kernel module fuse (modprobe fuse)|dev:/dev/fuse"
    "qemu-system-x86_64|qemu-system-x86|cmd:qemu-system-x86_64"
    "qemu-img|qemu-utils|cmd:qemu-img"
    "qemu-io|qemu-utils|cmd:qemu-io"
    "fio|fio|cmd:fio"
    "bindfs|bindfs|cmd:bindfs"
    "busybox (static)|busybox-static|static:/bin/busybox"
    "cpio|cpio|cmd:cpio"
    "xz|xz-utils|cmd:xz"
    "zstd|zstd|cmd:zstd"
    "depmod|kmod|cmd:depmod"
    "strace|strace|cmd:strace"
    "python3|python3|cmd:python3"
    "findmnt|util-linux|cmd:findmnt"
    "mkfs.ext4|e2fsprogs|cmd:mkfs.ext4"
    "dumpe2fs|e2fsprogs|cmd:dumpe2fs"
    "apt-get|apt|cmd:apt-get"
    "dpkg-deb|dpkg|cmd:dpkg-deb"
    "systemd-analyze|systemd|cmd:systemd-analyze"
    "systemd-escape|systemd|cmd:systemd-escape"
    "man|man-db|cmd:man"
    "strip|binutils|cmd:strip"
    "prometheus_client (python3)|python3-prometheus-client|py:prometheus_client"
    "curl|curl|cmd:curl"
    "libvirtd|libvirt-daemon|cmd:libvirtd"
    "virtlogd|libvirt-daemon-log|cmd:virtlogd"
    "virsh|libvirt-clients|cmd:virsh"
    "libvirt qemu driver|libvirt-daemon-driver-qemu|file:/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so"
    "libvirt network driver|libvirt-daemon-driver-network|file:/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_network.so"
    "garage|cargo install garage (vdrep_install_garage)|garage:"
)

# Garage, the S3 engine the object-store tests run against (AGPL: run as a
# separate process, never linked): $VDREP_GARAGE, else ../shared/bin/garage
# beside the checkout (prebuilt from the same crate), else ~/.cargo/bin/garage
# (built by vdrep_install_garage), else garage on PATH. tests/garageutil
# looks in the same order.
VDREP_GARAGE_VERSION=2.5.0
VDREP_GARAGE_FEATURES=bundled-libs,lmdb,sqlite
_VDREP_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

vdrep_garage_path() {
    local p
    for p in "${VDREP_GARAGE:-}" "$_VDREP_REPO/../shared/bin/garage" "$HOME/.cargo/bin/garage"; do
        [[ -n "$p" && -x "$p" ]] && { echo "$p"; return 0; }
    done
    command -v garage 2>/dev/null
}

# Build Garage from crates.io into ~/.cargo/bin unless one is found (about
# 10 minutes on a 2-core machine).
vdrep_install_garage() {
    vdrep_garage_path >/dev/null && return 0
    vdrep_log "building garage $VDREP_GARAGE_VERSION (cargo install, features $VDREP_GARAGE_FEATURES)"
    cargo install garage --locked --version "$VDREP_GARAGE_VERSION" \
        --no-default-features --features "$VDREP_GARAGE_FEATURES" || {
        vdrep_log "cargo install garage failed"
        return 1
    }
}

# The file system under folder $1, for a benchmark's header: type, device
# and, for ext4, whether it has a journal (the receiver creates files every
# cycle; one run in session 30 cost 0.70x the CPU per cycle on a journaled
# ext4: kernel-notes/replication-speed.md).
vdrep_fs_desc() {
    local fstype src dev journal=""
    fstype="$(findmnt -n -o FSTYPE --target "$1" 2>/dev/null | tail -n 1)"
    src="$(findmnt -n -o SOURCE --target "$1" 2>/dev/null | tail -n 1)"
    if [[ "$fstype" == ext4 ]]; then
        dev="${src##*/}"
        if compgen -G "/proc/fs/jbd2/$dev-*" >/dev/null; then
            journal=", with a journal"
        else
            journal=", no journal"
        fi
    fi
    printf '%s on %s%s\n' "${fstype:-?}" "${src:-?}" "$journal"
}

vdrep_log() { printf '%s\n' "$*" >&2; }

# The benchmarks' receiver (bench-replication.sh, bench-objectstore.sh) on a
# free loopback port: vdrep_bench_receiver VDREP STORE KEYDIR TRUST LOGDIR.
# Sets RECV_PID and RECV_ADDR; fails if it is not listening within 10 s.
vdrep_bench_receiver() {
    local vdrep="$1" store="$2" keys="$3" trust="$4" log="$5"
    "$vdrep" receive --listen 127.0.0.1:0 --store "$store" --keys "$keys" --trust "$trust" \
        >"$log/receiver.out" 2>>"$log/receiver.log" &
    RECV_PID=$!
    for _ in $(seq 100); do grep -q '^listening on' "$log/receiver.out" 2>/dev/null && break; sleep 0.1; done
    RECV_ADDR="$(sed -n 's/^listening on \([^ ]*\).*/\1/p' "$log/receiver.out")"
    [[ -n "$RECV_ADDR" ]]
}

# Prerequisites a caller does not need, by name (space-separated): the demo
# sets VDREP_SKIP_PREREQS=garage (it uses the embedded local store, and
# building Garage takes ~10 minutes where ../shared/bin/garage is absent).
_vdrep_skipped() { [[ " ${VDREP_SKIP_PREREQS:-} " == *" $1 "* ]]; }

_vdrep_which() { # COMMAND -> its path, or nothing
    command -v "$1" 2>/dev/null && return 0
    local d
    for d in /sbin /usr/sbin; do [[ -x "$d/$1" ]] && { echo "$d/$1"; return 0; }; done
    return 1
}

# Version of one prerequisite (NAME|PACKAGE|HOW), or nothing when it is missing.
_vdrep_prereq_version() {
    local pkg="$2" how="$3" path v
    case "$how" in
        cmd:*)
            path="$(_vdrep_which "${how#cmd:}")" || return 1
            case "${how#cmd:}" in
                cargo|rustc) v="$("$path" --version 2>/dev/null | head -1)" ;;
                *) v="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)" ;;
            esac
            echo "${v:-present} ($path)" ;;
        static:*)
            path="${how#static:}"
            [[ -x "$path" ]] || return 1
            ldd "$path" >/dev/null 2>&1 && return 1   # dynamically linked: not the static build
            v="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)"
            echo "${v:-present} ($path)" ;;
        dev:*)
            [[ -c "${how#dev:}" ]] || return 1
            echo "present" ;;
        py:*)
            /usr/bin/python3 -c "import ${how#py:}" 2>/dev/null || return 1
            v="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)"
            echo "${v:-present} (/usr/bin/python3 module ${how#py:})" ;;
        file:*)
            [[ -f "${how#file:}" ]] || return 1
            v="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)"
            echo "${v:-present}" ;;
        garage:)
            path="$(vdrep_garage_path)" || return 1
            v="$("$path" --version 2>/dev/null | head -1)"
            echo "${v:-present} ($path)" ;;
        *) return 1 ;;
    esac
}

# Free space the build and the tests need on the file systems of the repo
# (target/) and of the temporary folder (test images, stores, logs), in GiB.
# A debug build of every test binary is ~9 GiB; the suite's images ~2 GiB.
VDREP_MIN_FREE_GIB="${VDREP_MIN_FREE_GIB:-14}"

# Print the free space of the repo's and TMPDIR's file systems; return 1 (with
# what to do) if either has less than VDREP_MIN_FREE_GIB. A full disk otherwise
# shows up 20 minutes later as ENOSPC in whichever test runs first.
vdrep_check_space() {
    local dir free rc=0 seen=""
    for dir in "$(pwd)" "${TMPDIR:-/tmp}"; do
        local dev
        dev="$(stat -c %d "$dir")"
        [[ " $seen " == *" $dev "* ]] && continue
        seen="$seen $dev"
        free=$(( $(df -Pk "$dir" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
        if (( free < VDREP_MIN_FREE_GIB )); then
            printf '  %-20s %s GiB free: LOW (need %s GiB)\n' "$dir" "$free" "$VDREP_MIN_FREE_GIB"
            rc=1
        else
            printf '  %-20s %s GiB free\n' "$dir" "$free"
        fi
    done
    if (( rc != 0 )); then
        vdrep_log "not enough free disk space: the build and the tests need ${VDREP_MIN_FREE_GIB} GiB on each file system above; free some (old target/ folders, git worktrees, /tmp) and run again"
    fi
    return "$rc"
}

# Print one line per prerequisite: name, version or "missing", and the package
# that provides it. Returns 1 if any is missing.
vdrep_prereq_report() {
    local line name pkg how v rc=0
    for line in "${VDREP_PREREQS[@]}"; do
        IFS='|' read -r name pkg how <<<"$line"
        _vdrep_skipped "$name" && continue
        if v="$(_vdrep_prereq_version "$name" "$pkg" "$how")"; then
            printf '  %-20s %s\n' "$name" "$v"
        else
            printf '  %-20s MISSING (install: %s)\n' "$name" "$pkg"
            rc=1
        fi
    done
    return "$rc"
}

# Print the packages whose prerequisites are missing (one per line, deduplicated).
vdrep_missing_prereqs() {
    local line name pkg how
    for line in "${VDREP_PREREQS[@]}"; do
        IFS='|' read -r name pkg how <<<"$line"
        _vdrep_skipped "$name" && continue
        _vdrep_prereq_version "$name" "$pkg" "$how" >/dev/null || echo "$pkg"
    done | sort -u
}

# The apt suite QEMU must be installed from: the suite of the installed
# qemu-utils ("bookworm-backports" for a ~bpo12 version), else empty (default).
vdrep_qemu_suite() {
    local qver
    qver="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
    case "$qver" in
        *bpo12*) echo bookworm-backports ;;
        *bpo11*) echo bullseye-backports ;;
        *) echo "" ;;
    esac
}

# Make sure apt knows SUITE (a Debian backports suite).
_vdrep_ensure_suite() {
    local suite="$1"
    if apt-cache policy 2>/dev/null | grep -q " $suite/main"; then return 0; fi
    grep -rqs -- "$suite" /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
    vdrep_log "adding the apt suite $suite (qemu-utils $(dpkg-query -W -f='${Version}' qemu-utils) comes from it)"
    cat > "/etc/apt/sources.list.d/$suite.sources" <<SRC || return 1
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

# apt-get install everything (root, Debian). Safe to re-run. Every step is
# checked: returns non-zero, with the reason on stderr, if any step fails or
# if a prerequisite is still missing afterwards.
vdrep_install_prereqs() {
    if [[ "$(id -u)" != 0 ]]; then
        vdrep_log "not root: cannot apt-get install; missing: $(vdrep_missing_prereqs | tr '\n' ' ')"
        vdrep_log "fix: run as root (sudo), or install those packages by hand"
        return 1
    fi
    command -v apt-get >/dev/null || {
        vdrep_log "no apt-get: install by hand: ${VDREP_APT_PACKAGES[*]} ${VDREP_QEMU_PACKAGES[*]} ${VDREP_LIBVIRT_PACKAGES[*]}"
        return 1
    }
    export DEBIAN_FRONTEND=noninteractive
    local suite target=()
    suite="$(vdrep_qemu_suite)"
    if [[ -n "$suite" ]]; then
        _vdrep_ensure_suite "$suite" || { vdrep_log "cannot add the apt suite $suite"; return 1; }
        target=(-t "$suite")
    fi
    apt-get update -q || { vdrep_log "apt-get update failed: check /etc/apt/sources.list*"; return 1; }
    apt-get install -y -q --no-install-recommends "${VDREP_APT_PACKAGES[@]}" || {
        vdrep_log "apt-get install ${VDREP_APT_PACKAGES[*]} failed"
        return 1
    }
    apt-get install -y -q --no-install-recommends "${target[@]}" "${VDREP_QEMU_PACKAGES[@]}" || {
        vdrep_log "apt-get install ${target[*]} ${VDREP_QEMU_PACKAGES[*]} failed (qemu-utils suite: ${suite:-default})"
        return 1
    }
    apt-get install -y -q --no-install-recommends "${target[@]}" "${VDREP_LIBVIRT_PACKAGES[@]}" || {
        vdrep_log "apt-get install ${target[*]} ${VDREP_LIBVIRT_PACKAGES[*]} failed (libvirt must come from QEMU's suite: ${suite:-default})"
        return 1
    }
    _vdrep_skipped garage || vdrep_install_garage || return 1
    # FUSE needs /dev/fuse; load the module if it is not built in.
    [[ -c /dev/fuse ]] || modprobe fuse 2>/dev/null || true
    local report
    if ! report="$(vdrep_prereq_report)"; then
        vdrep_log "still missing after the install:"
        grep MISSING <<<"$report" >&2
        vdrep_log "(a package that apt reports as installed but whose command is missing: check PATH, or reinstall it with apt-get install --reinstall)"
        return 1
    fi
}

# Section headers with timing: vdrep_section "name" ... vdrep_section_end
VDREP_SECTIONS=()
vdrep_section() {
    vdrep_section_end
    VDREP_SECTION_NAME="$1"
    VDREP_SECTION_START="$(date +%s)"
    printf '\n==================== %s ====================\n' "$1"
}
vdrep_section_end() {
    if [[ -n "${VDREP_SECTION_NAME:-}" ]]; then
        local secs=$(( $(date +%s) - VDREP_SECTION_START ))
        printf -- '-------------------- %s: %ss\n' "$VDREP_SECTION_NAME" "$secs"
        VDREP_SECTIONS+=("$(printf '%-28s %5ss' "$VDREP_SECTION_NAME" "$secs")")
        VDREP_SECTION_NAME=""
    fi
}
vdrep_section_summary() {
    vdrep_section_end
    printf '\n==================== timings ====================\n'
    printf '%s\n' "${VDREP_SECTIONS[@]}"
}
