# shellcheck shell=bash
# Shared helpers for vdrep's scripts (.ci/run, scripts/demo.sh, scripts/test.sh).
# Source it: . "$REPO/scripts/lib.sh"

# Debian packages the tests, the demo, the benchmark and the tiny VM need.
VDREP_APT_PACKAGES=(
    fuse3 qemu-system-x86 qemu-utils fio bindfs busybox-static cpio xz-utils zstd kmod
    python3 util-linux gzip dpkg apt ca-certificates e2fsprogs
)
# Commands checked by `vdrep_missing_prereqs` (command -> package).
declare -A VDREP_PREREQ_CMDS=(
    [fusermount3]=fuse3 [qemu-system-x86_64]=qemu-system-x86 [qemu-img]=qemu-utils
    [qemu-io]=qemu-utils [fio]=fio [bindfs]=bindfs [cpio]=cpio [xz]=xz-utils [zstd]=zstd
    [depmod]=kmod [python3]=python3 [findmnt]=util-linux [mkfs.ext4]=e2fsprogs [dumpe2fs]=e2fsprogs
)

vdrep_log() { printf '%s\n' "$*" >&2; }

# Print the packages whose commands are missing (one per line, deduplicated).
vdrep_missing_prereqs() {
    local cmd
    {
        for cmd in "${!VDREP_PREREQ_CMDS[@]}"; do
            command -v "$cmd" >/dev/null 2>&1 || [[ -x "/sbin/$cmd" || -x "/usr/sbin/$cmd" ]] \
                || echo "${VDREP_PREREQ_CMDS[$cmd]}"
        done
        [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || echo busybox-static
    } | sort -u
}

# apt-get install everything (root, Debian/Ubuntu). Safe to re-run.
# qemu-system-x86 must come from the same suite as an already installed
# qemu-utils: Debian 12 images may carry qemu-utils from bookworm-backports,
# and installing bookworm's qemu-system-x86 would then remove qemu-utils.
vdrep_install_prereqs() {
    if [[ "$(id -u)" != 0 ]]; then
        vdrep_log "not root: cannot apt-get install; missing: $(vdrep_missing_prereqs | tr '\n' ' ')"
        return 1
    fi
    command -v apt-get >/dev/null || { vdrep_log "no apt-get: install by hand: ${VDREP_APT_PACKAGES[*]}"; return 1; }
    export DEBIAN_FRONTEND=noninteractive
    local qver target=()
    qver="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
    if [[ "$qver" == *bpo12* ]]; then
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            vdrep_log "qemu-utils $qver is from bookworm-backports: adding that suite so qemu-system-x86 matches"
            cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        fi
        target=(-t bookworm-backports)
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${VDREP_APT_PACKAGES[@]}"
    if [[ ${#target[@]} -gt 0 ]]; then
        apt-get install -y -q --no-install-recommends "${target[@]}" qemu-system-x86 qemu-utils
    fi
    # FUSE needs /dev/fuse; load the module if we can (harmless if built in).
    [[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || true
    [[ -e /dev/fuse ]] || vdrep_log "warning: /dev/fuse is missing: FUSE tests will fail or skip"
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
