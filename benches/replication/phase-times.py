#!/usr/bin/env python3
"""Where a replication cycle's time goes: aggregate the `vdrep::cycle_time`
debug events (`util::phase`) of one or more daemon logs into one row per
phase: count, mean, p50, p90, p99, max (ms) and the total (s).

    phase-times.py [--since 2026-12-03T18:00:00] [--until ...] LOG...

Only events whose timestamp is in [since, until) count (ISO, UTC; the
log's own format). Output: a Markdown table on stdout.
"""
import argparse, re, statistics, sys
from collections import defaultdict

ap = argparse.ArgumentParser()
ap.add_argument("--since")
ap.add_argument("--until")
ap.add_argument("logs", nargs="+")
a = ap.parse_args()
ansi = re.compile(r"\x1b\[[0-9;]*m")
ev = re.compile(r"vdrep::cycle_time: .*?phase=\"?([a-z_]+)\"?.*?\bms=([0-9.eE+-]+)")
by = defaultdict(list)
for path in a.logs:
    try:
        f = open(path, errors="replace")
    except OSError as e:
        print(f"cannot read {path}: {e}", file=sys.stderr)
        continue
    for line in f:
        if "vdrep::cycle_time" not in line:
            continue
        line = ansi.sub("", line)
        ts = line.split(" ", 1)[0].strip()
        if a.since and ts < a.since:
            continue
        if a.until and ts >= a.until:
            continue
        m = ev.search(line)
        if m:
            by[m.group(1)].append(float(m.group(2)))

def pct(xs, p):
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)

print("| phase | count | mean ms | p50 ms | p90 ms | p99 ms | max ms | total s |")
print("|---|---|---|---|---|---|---|---|")
for ph in sorted(by, key=lambda p: -sum(by[p])):
    xs = sorted(by[ph])
    print(f"| {ph} | {len(xs)} | {statistics.fmean(xs):.1f} | {pct(xs, 50):.1f} | {pct(xs, 90):.1f} | "
          f"{pct(xs, 99):.1f} | {xs[-1]:.1f} | {sum(xs) / 1e3:.1f} |")
