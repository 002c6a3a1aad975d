#!/usr/bin/env bash
# Build the vdrep .deb with cargo-deb ([package.metadata.deb] in Cargo.toml):
# the binary, the systemd units, /etc/vdrep/vdrep.toml.example, man pages
# and bash/zsh/fish completions (generated here by the binary itself).
#
#   scripts/build-deb.sh [--profile release|dev] [--check]
#
# --profile: the cargo profile whose binary is packaged (default release,
#   built here if needed; `dev` reuses the debug build of scripts/test.sh,
#   as CI does, so packaging costs no second compile). The binary is stripped.
# --check (root): install the package with dpkg -i, check that `vdrep
#   --version` runs, the installed units pass `systemd-analyze verify`
#   (including their man: Documentation= links), the completions and man
#   pages are there, then dpkg -r (and --purge) it. Fails if anything is
#   missing.
# Installs cargo-deb from crates.io (cargo install --locked, pinned) if it is
# missing: ~8 min of compiling once per machine; packaging itself takes ~15 s.
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"

profile=release
check=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
        --check) check=1; shift ;;
        *) echo "usage: scripts/build-deb.sh [--profile release|dev] [--check]" >&2; exit 2 ;;
    esac
done
case "$profile" in
    release) bindir=target/release ;;
    dev|debug) profile=dev; bindir=target/debug ;;
    *) echo "build-deb: --profile release or dev" >&2; exit 2 ;;
esac

start="$(date +%s)"
# Pinned: packaging the dev profile (CI) is a warning in 3.8 that later
# versions may turn into an error.
CARGO_DEB_VERSION=3.8.0
if [[ "$(cargo deb --version 2>/dev/null || true)" != *"$CARGO_DEB_VERSION"* ]]; then
    echo "build-deb: installing cargo-deb $CARGO_DEB_VERSION (cargo install --locked; a few minutes, once)"
    nice -n 10 cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

echo "build-deb: cargo build --profile $profile --bin vdrep"
nice -n 10 cargo build --profile "$profile" --bin vdrep
bin="$REPO/$bindir/vdrep"

# Man pages and completions, from the binary being packaged.
assets="$REPO/target/assets"
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$bin" man --out "$assets/man" >/dev/null
gzip -9n "$assets"/man/*.1
"$bin" completions bash >"$assets/completions/vdrep.bash"
"$bin" completions zsh >"$assets/completions/_vdrep"
"$bin" completions fish >"$assets/completions/vdrep.fish"

# cargo-deb maps the target/release/ asset paths to the profile's folder.
deb="$(cargo deb --no-build --profile "$profile" --fast | tail -1)"
[[ -f "$deb" ]] || { echo "build-deb: cargo deb did not print the package path" >&2; exit 1; }
echo "build-deb: $(dpkg-deb -f "$deb" Package Version Architecture | tr '\n' ' ')$(du -h "$deb" | cut -f1) in $(( $(date +%s) - start ))s"

if [[ "$check" == 1 ]]; then
    [[ "$(id -u)" == 0 ]] || { echo "build-deb: --check needs root (dpkg -i)" >&2; exit 2; }
    if [[ "$(dpkg-query -W -f='${Status}' vdrep 2>/dev/null || true)" == *" installed" ]]; then
        echo "build-deb: a vdrep package is installed already; remove it first (dpkg -r vdrep)" >&2
        exit 1
    fi
    tmp="$(mktemp -d)"
    cleanup() { dpkg --purge vdrep >/dev/null 2>&1 || true; rm -rf "$tmp"; }
    trap cleanup EXIT
    dpkg -i "$deb"
    fail() { echo "build-deb: check FAILED: $*" >&2; exit 1; }
    /usr/bin/vdrep --version || fail "vdrep --version"
    for f in /lib/systemd/system/vdrep-mount@.service /lib/systemd/system/vdrep-receive.service \
        /etc/vdrep/vdrep.toml.example /etc/logrotate.d/vdrep \
        /usr/share/bash-completion/completions/vdrep /usr/share/zsh/vendor-completions/_vdrep \
        /usr/share/fish/vendor_completions.d/vdrep.fish \
        /usr/share/man/man1/vdrep.1.gz /usr/share/man/man1/vdrep-mount.1.gz \
        /usr/share/man/man1/vdrep-receive.1.gz; do
        [[ -s "$f" ]] || fail "$f is missing or empty"
    done
    man -w vdrep-mount >/dev/null || fail "man vdrep-mount does not resolve"
    grep -q 'complete -F' /usr/share/bash-completion/completions/vdrep || fail "bash completion"
    /usr/bin/vdrep completions bash | cmp -s - /usr/share/bash-completion/completions/vdrep \
        || fail "the packaged bash completion differs from vdrep completions bash"
    # A template is verified through an instance (a copy named like one).
    cp /lib/systemd/system/vdrep-mount@.service "$tmp/vdrep-mount@srv-vms.service"
    systemd-analyze verify /lib/systemd/system/vdrep-receive.service "$tmp/vdrep-mount@srv-vms.service" \
        2>"$tmp/verify.err" || { cat "$tmp/verify.err" >&2; fail "systemd-analyze verify"; }
    [[ ! -s "$tmp/verify.err" ]] || { cat "$tmp/verify.err" >&2; fail "systemd-analyze verify warned"; }
    dpkg -r vdrep >/dev/null
    [[ ! -e /usr/bin/vdrep ]] || fail "dpkg -r left /usr/bin/vdrep"
    dpkg --purge vdrep >/dev/null
    [[ ! -e /etc/vdrep/vdrep.toml.example ]] || fail "dpkg --purge left /etc/vdrep/vdrep.toml.example"
    echo "build-deb: check OK (installed, vdrep --version, units verified, man pages and completions present, removed)"
fi
echo "$deb"
