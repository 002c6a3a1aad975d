#!/usr/bin/env bash
# How a replica's history costs grow with its length (release build): for
# histories of N cycles of one disk, a point at each, 1 s apart (a
# continuous VM's last N seconds), the time of the receiver's retention
# pass when nothing is dropped (it runs every minute for every VM), of
# reading the oldest point whole, and of a thinning prune that merges runs
# of about N/4 undo records, and of a metrics scrape's work per VM as it
# was (every point, applied_flags) and as it is (the points summary)
# (examples/history_scale.rs). Medians of RUNS. Then the time of one walk
# of the store for its size (allocated_bytes) over WALK_FILES small files,
# which the metrics endpoint now does in the background.
#
#   scripts/bench-history.sh
#
# Target (linear growth): each doubling of the history at most 2.5x the
# retention pass's time (PASS/MISS). A cubic pass (sessions before 33)
# grows 8x per doubling.
#
# Environment: SIZES="1000 2000 4000 8000" (history lengths), RUNS=3,
#   WALK_FILES=200000 (0: no walk),
#   BENCH_ROOT=/var/tmp/vdrep-histbench, NO_BUILD=1 (use the built example),
#   EXAMPLE=target/release/examples/history_scale,
#   BASE_EXAMPLE=path (another build of the example, e.g. of the previous
#   main, run alternately with EXAMPLE: adds its columns and the ratio).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIZES="${SIZES:-1000 2000 4000 8000}"
RUNS="${RUNS:-3}"
WALK_FILES="${WALK_FILES:-200000}"
BENCH_ROOT="${BENCH_ROOT:-/var/tmp/vdrep-histbench}"
EXAMPLE="${EXAMPLE:-$REPO/target/release/examples/history_scale}"
BASE_EXAMPLE="${BASE_EXAMPLE:-}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$REPO/bench-results/history-$STAMP.md"
RAW="$BENCH_ROOT/raw-$STAMP.jsonl"

say() { printf '[bench-history] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
command -v python3 >/dev/null || die "missing python3"
if [[ -z "${NO_BUILD:-}" ]]; then
    (cd "$REPO" && cargo build --release -q --example history_scale) || die "cargo build failed"
fi
[[ -x "$EXAMPLE" ]] || die "no example binary at $EXAMPLE (cargo build --release --example history_scale)"
[[ -z "$BASE_EXAMPLE" || -x "$BASE_EXAMPLE" ]] || die "BASE_EXAMPLE=$BASE_EXAMPLE is not executable"
mkdir -p "$BENCH_ROOT" "$REPO/bench-results"

for r in $(seq 1 "$RUNS"); do
    for n in $SIZES; do
        for which in new base; do
            bin="$EXAMPLE"
            if [[ "$which" == base ]]; then
                [[ -n "$BASE_EXAMPLE" ]] || continue
                bin="$BASE_EXAMPLE"
            fi
            say "run $r, $n points, $which"
            line="$("$bin" "$BENCH_ROOT/work" "$n")" || die "$bin failed on $n points"
            echo "{\"which\": \"$which\", \"run\": $r, \"r\": $line}" >> "$RAW"
        done
    done
done

if [[ "$WALK_FILES" != 0 ]]; then
    say "walk of $WALK_FILES files"
    line="$("$EXAMPLE" "$BENCH_ROOT/work" --walk "$WALK_FILES")" || die "the walk of $WALK_FILES files failed"
    echo "{\"which\": \"walk\", \"run\": 1, \"r\": $line}" >> "$RAW"
fi

python3 - "$RAW" "$OUT" <<'EOF'
import json, statistics, sys
raw, out = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(raw)]
walks = [r["r"] for r in rows if r["which"] == "walk"]
rows = [r for r in rows if r["which"] != "walk"]
def med(which, n, key):
    v = [r["r"][key] for r in rows if r["which"] == which and r["r"]["points"] == n]
    return statistics.median(v) if v else None
sizes = sorted({r["r"]["points"] for r in rows})
has_base = any(r["which"] == "base" for r in rows)
lines = ["# History at scale (examples/history_scale.rs)", "",
         f"Medians of {max(r['run'] for r in rows)} runs; one disk of 16 MiB, 8 random 4 KiB blocks per cycle, a point per cycle.", ""]
head = "| points | retention pass ms | x per doubling | newest point ms | list points ms | scrape/VM, by points ms | scrape/VM, by summary ms | scrape old/new | first scrape after a restart ms | read oldest point ms | its open files | thinning prune ms | records merged |"
sep = "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
if has_base:
    head += " base retention pass ms | base thinning ms | retention base/new | thinning base/new |"
    sep += "---|---|---|---|"
lines += [head, sep]
verdict = []
prev = None
for n in sizes:
    k, rd, th = med("new", n, "prune_keep_ms"), med("new", n, "read_oldest_ms"), med("new", n, "prune_thin_ms")
    mg = med("new", n, "merged")
    growth = "" if prev is None else f"{k / prev[1]:.2f}x" if prev[1] > 0 else ""
    if prev is not None and prev[1] > 0:
        verdict.append(k / prev[1] <= 2.5 * (n / prev[0]) / 2)
    nw, ls = med("new", n, "newest_ms"), med("new", n, "points_ms")
    nw = "" if nw is None else f"{nw:.2f}"
    ls = "" if ls is None else f"{ls:.2f}"
    so, sn = med("new", n, "scrape_old_ms"), med("new", n, "scrape_new_ms")
    sr = "" if not so or not sn else f"{so / sn:,.0f}x"
    so = "" if so is None else f"{so:.2f}"
    sn = "" if sn is None else f"{sn:.4f}"
    sc = med("new", n, "scrape_cold_ms")
    sc = "" if sc is None else f"{sc:.2f}"
    fd = med("new", n, "reader_fds")
    fd = "" if fd is None else f"{fd:.0f}"
    row = f"| {n:,} | {k:.2f} | {growth} | {nw} | {ls} | {so} | {sn} | {sr} | {sc} | {rd:.1f} | {fd} | {th:.1f} | {mg:.0f} |"
    if has_base:
        bk, bth = med("base", n, "prune_keep_ms"), med("base", n, "prune_thin_ms")
        row += f" {bk:.2f} | {bth:.1f} | {bk / k:,.1f}x | {bth / th:,.1f}x |"
    lines.append(row)
    prev = (n, k)
ok = all(verdict) if verdict else False
lines += ["", f"Target: the retention pass grows at most 2.5x per doubling of the history: **{'PASS' if ok else 'MISS'}**"]
for w in walks:
    lines += ["", f"Walk of the store for its size (allocated_bytes, warm caches, median of 3): {w['walk_files']:,} files in {w['walk_ms']:.1f} ms ({w['walk_ms'] * 1e3 / w['walk_files']:.2f} us per file)"]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
say "table in $OUT"
