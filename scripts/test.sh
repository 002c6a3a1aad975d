#!/usr/bin/env bash
# Run vdrep's tests: `cargo build --all-targets` (the vdrep binary the
# integration tests run and the test binaries, in one build), then every test
# with cargo-nextest (`cargo nextest run --all-targets --no-fail-fast`,
# settings in .config/nextest.toml: test binaries overlap, VM and libvirt
# tests run one at a time) and the doc tests; without cargo-nextest, or with
# VDREP_TEST_RUNNER=cargo, `cargo test --all-targets --no-fail-fast`.
# Extra arguments go to the runner (e.g. scripts/test.sh --test vm_guest).
# On a clean machine, as root, it first installs the missing prerequisites
# (FUSE, QEMU, fio, ...; NO_INSTALL=1 only reports them) and builds the tiny
# test VM unless it is current (NO_BUILD_VM=1 skips that).
# VDREP_STRICT=1 (set by .ci/run): a test that would skip a check because a
# prerequisite is missing fails instead; on CI everything is installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"

command -v cargo >/dev/null || { echo "test.sh: cargo not found (install Rust with rustup)" >&2; exit 2; }
missing="$(vdrep_missing_prereqs | tr '\n' ' ')"
if [[ -n "${missing// /}" && "$(id -u)" == 0 && "${NO_INSTALL:-0}" != 1 ]]; then
    # A fresh machine: the README's second command must work on its own.
    echo "==> installing missing prerequisites: $missing"
    vdrep_install_prereqs || { echo "test.sh: installing the prerequisites failed (see above)" >&2; exit 1; }
    missing="$(vdrep_missing_prereqs | tr '\n' ' ')"
fi
if [[ -n "${missing// /}" ]]; then
    echo "test.sh: missing packages: $missing" >&2
    echo "test.sh: tests that need them will fail or print SKIP; install with: sudo scripts/test.sh  (or apt-get install $missing)" >&2
elif [[ "${NO_BUILD_VM:-0}" != 1 ]]; then
    echo "==> tiny test VM (scripts/build-tiny-vm.sh: does nothing when current)"
    scripts/build-tiny-vm.sh || echo "test.sh: building the tiny test VM failed: the VM tests will fail or print SKIP" >&2
fi
[[ -e /dev/fuse ]] || echo "test.sh: warning: /dev/fuse is missing; FUSE mount tests cannot work" >&2
[[ "$(id -u)" == 0 ]] || echo "test.sh: note: not root; FUSE mounts need fusermount3 (setuid) or root" >&2

START="$(date +%s)"
LOG="$REPO/target/test-output.log"
mkdir -p "$REPO/target"

# The whole suite: one cargo invocation builds the binary, the library's
# unit tests and every test target together, with one feature set (the
# dev-dependencies turn on features of bitflags and regex-syntax, so a
# plain `cargo build` before the tests compiled vdrep a second time); the
# library and its test build overlap on the two cores and the runner below
# builds nothing. (Naming those features in [dependencies] so that every
# build shares them made the release binary slower at scale: session 31,
# kernel-notes/replication-speed.md.) With arguments (one test target),
# only the binary first.
if [[ $# == 0 ]]; then
    echo "==> cargo build --all-targets"
    cargo build --all-targets
else
    echo "==> cargo build"
    cargo build
fi

runner="${VDREP_TEST_RUNNER:-nextest}"
if [[ "$runner" == nextest ]] && ! cargo nextest --version >/dev/null 2>&1; then
    echo "test.sh: cargo-nextest not found (cargo install cargo-nextest --locked); using cargo test" >&2
    runner=cargo
fi
# Tests that skip a check (a missing prerequisite) name it here; nextest
# does not show a passing test's output.
export VDREP_SKIP_LOG="$REPO/target/test-skips.log"
: >"$VDREP_SKIP_LOG"
set +e
if [[ "$runner" == nextest ]]; then
    echo "==> cargo nextest run --all-targets --no-fail-fast $*"
    cargo nextest run --all-targets --no-fail-fast "$@" 2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
    if [[ $# == 0 ]]; then
        echo "==> cargo test --doc"
        cargo test --doc 2>&1 | tee -a "$LOG"
        doc_rc=${PIPESTATUS[0]}
        [[ "$rc" != 0 ]] || rc=$doc_rc
    fi
else
    echo "==> cargo test --all-targets --no-fail-fast $*"
    cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
fi
set -e

# Closing summary.
python3 - "$LOG" "$rc" "$(( $(date +%s) - START ))" "$VDREP_SKIP_LOG" <<'PY' || true
import re, sys
log, rc, secs = open(sys.argv[1], errors="replace").read(), int(sys.argv[2]), sys.argv[3]
tot = {"passed": 0, "failed": 0, "ignored": 0}
# cargo test (and the doc tests): one "test result" line per binary.
for m in re.finditer(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", log, re.M):
    for k, v in zip(("passed", "failed", "ignored"), m.groups()):
        tot[k] += int(v)
failed = set(re.findall(r"^test (\S+) \.\.\. FAILED", log, re.M))
# nextest: "PASS [ 1.2s] (n/N) vdrep::suite test" lines (a failure is listed
# again at the end) and one Summary line with the counts.
binaries = set()
for status, suite, name in re.findall(
    r"^\s*(PASS|FAIL|SIGSEGV|SIGABRT|SIGKILL|TIMEOUT|ABORT)\s+\[[^\]]*\]\s+(?:\(\s*\d+/\d+\)\s+)?(\S+)\s+(\S+)\s*$",
    log, re.M):
    binaries.add(suite)
    if status != "PASS":
        failed.add(f"{suite} {name}")
for line in re.findall(r"^\s*Summary \[.*$", log, re.M):
    for k, word in (("passed", "passed"), ("failed", "failed"), ("ignored", "skipped")):
        m = re.search(r"(\d+) " + word, line)
        if m:
            tot[k] += int(m.group(1))
failed = sorted(failed)
skips = sorted(set(re.findall(r"^SKIP: .*$", log, re.M)) |
               set(l for l in open(sys.argv[4], errors="replace").read().splitlines() if l.strip()))
suites = (len(re.findall(r"^\s+Running ", log, re.M)) + len(re.findall(r"^\s+Doc-tests ", log, re.M))
          + len(binaries))
print("\n==================== test summary ====================")
print(f"suites: {suites}  passed: {tot['passed']}  failed: {tot['failed']}  ignored: {tot['ignored']}  time: {secs}s")
slow = sorted(((float(t), f"{s} {n}") for t, s, n in re.findall(
    r"^\s*PASS\s+\[\s*([\d.]+)s\]\s+(?:\(\s*\d+/\d+\)\s+)?(\S+)\s+(\S+)\s*$", log, re.M)), reverse=True)[:8]
if slow:
    print("slowest: " + ", ".join(f"{n} {t:.0f}s" for t, n in slow))
for s in skips:
    print(s)
for f in failed:
    print(f"FAILED: {f}")
print("RESULT: " + ("PASS" if rc == 0 else f"FAIL (test runner exit {rc})"))
PY
exit "$rc"
