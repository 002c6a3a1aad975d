#!/usr/bin/env bash
# Replication over an emulated WAN (issue 14): initial copy, 1 % delta and
# continuous RPO under churn through examples/wan_relay (delay, loss, rate
# cap), per link and congestion controller, with PASS/MISS per target.
#
#   scripts/bench-wan.sh
#   LINKS="100:50:0.005" CCS="bbr cubic" SECTIONS="initial" scripts/bench-wan.sh
#
# Environment (see benches/wan/bench_wan.py for all):
#   LINKS="100:50:0 100:50:0.0005 100:50:0.005 1000:20:0.0005 10:150:0"
#          rate_mbit:rtt_ms:loss[:initial_MiB] (loss per direction, a fraction;
#          the copy defaults to IDEAL_SECS of the link; issue 14 used 64 / 128 / 256 MiB)
#   CCS="bbr"            congestion controllers to compare (bbr cubic newreno)
#   SECTIONS="initial delta rpo branch"  IDEAL_SECS=8 (initial copy size = link rate x this)
#                        the table ends with the issue's targets, one line each, PASS/MISS
#   SECTIONS=branch      (on links up to BRANCH_MAX_MBIT=10 by default) two VMs on one link: a quiet VM (QUIET_FRAC=0.05 of the
#                        link) alone, then beside a hot VM (HOT_FRAC=2, HOT_MIB=256)
#                        for BRANCH_SECS=20 each; e.g. LINKS="10:150:0" SECTIONS=branch
#   SECTIONS=fleet       FLEET_VMS=16 VMs on one link (--link-max-rate FLEET_LINK_CAP=0.9,
#                        --max-rate FLEET_VM_CAP=0.75 of the link): 15 continuous VMs churn
#                        FLEET_CHURN_FRAC=0.25 of the link together, alone for FLEET_SECS=10,
#                        then while the 16th copies FLEET_BIG_MIB (12 s of the link)
#   VARIANTS="VDREP_WINDOW_TUNE=0 -"   fixed flow-control windows (before s7) vs sized
#                        to the path
#   VDREP_LOG="info,vdrep::cwnd_cap=debug"  window-cap time-line: each copy
#                        reports when the cap engaged
#   RPO_SECS=30  CHURN_FRAC=0.333  DELTA_PCT=1  KEEP=1  NO_BUILD=1
#   RUNS=3               runs per link and variant; the table shows medians
#   VARIANTS="VDREP_COMMIT_AHEAD=0 -"   A/B in one run, runs interleaved
#                        (each "VAR=VALUE,..." is added to vdrep's env;
#                        RELAY_BIN=PATH swaps the relay, VDREP_BIN=PATH vdrep:
#                        VARIANTS="VDREP_BIN=/tmp/base/vdrep -" is base vs this build)
#   VDREP_LOG="info,vdrep::link_stats=debug"   link time-line in sender.log
#   VDREP_LOG="info,vdrep::copy_time=debug"    each copy's steps on both ends, ms after
#                        `protect` (the initial copy's time ends at the sender's log line
#                        of the committed point; "protect + sync" is in the JSON)
#   VARIANTS="VDREP_PROBE_REUSE=0 -"           the worker dials again after protect's probe
#                        (before s11) vs running on the probe's session;
#                        VDREP_INITIAL_WRITEBACK=0: the receiver only fsyncs a copy
#   AGAIN=1              initial: after the copy, a second VM of the same mount copies as much
#                        to the same receiver (the second connection to that destination in
#                        the sending process; the first copy is always a first connection)
#   BENCH_ROOT=/var/tmp/vdrep-wanbench
# Needs root (FUSE mount), fio, python3. Release build. Results in
# bench-results/wan-<UTC>.{md,json}.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ "$(id -u)" == 0 ]] || { echo "bench-wan: run as root (FUSE mount)" >&2; exit 1; }
for t in fio python3 fusermount3; do
    command -v "$t" >/dev/null || { echo "bench-wan: missing $t (run scripts/check-prereqs.sh)" >&2; exit 1; }
done
if [[ "${NO_BUILD:-0}" != 1 ]]; then
    (cd "$REPO" && cargo build --release -q && cargo build --release -q --example wan_relay)
fi
exec python3 "$REPO/benches/wan/bench_wan.py"
