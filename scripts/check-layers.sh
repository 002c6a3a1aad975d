#!/usr/bin/env bash
# Layering check for src/ (issue 13, "Must show" 1).
#
# Reads every `crate::…` path (in `use` lines and inline paths; comments and
# doc comments are skipped) of every file under src/, maps the file and the
# referenced path to their top-level modules (src/foo.rs and src/foo/** are
# module `foo`), and fails (exit 1) if
#   (a) a file outside src/cli/ references `crate::cli`, printing file:line; or
#   (b) the graph of top-level modules has a cycle, printing the cycle and
#       one file:line per edge of it.
# Allowed exceptions are listed in ALLOWED_EDGES below, each with a reason;
# an allowed edge is left out of the graph.
# Usage: scripts/check-layers.sh [SRC_DIR]   (default: src next to this script)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:-$here/src}"
exec python3 - "$src" <<'PY'
import os, re, sys

src = sys.argv[1]

# (from_module, to_module): reason. Keep this list short and justified.
ALLOWED_EDGES = {
}

ROOTS = {"lib.rs", "main.rs"}
path_re = re.compile(r"\bcrate::([A-Za-z_][A-Za-z0-9_]*)")
# `use crate::{a, b::{c, d}}` groups: the top-level names inside the braces.
group_re = re.compile(r"\bcrate::\{")


def group_items(text, start):
    """Top-level items of the brace group opening at text[start]."""
    depth, item, items = 0, "", []
    for c in text[start:]:
        if c == "{":
            depth += 1
            if depth == 1:
                continue
        elif c == "}":
            depth -= 1
            if depth == 0:
                items.append(item)
                return items
        elif c == "," and depth == 1:
            items.append(item)
            item = ""
            continue
        item += c
    return items


def module_of(rel):
    parts = rel.split(os.sep)
    if len(parts) == 1:
        if parts[0] in ROOTS:
            return None
        return parts[0][:-3]
    return parts[0]


def strip_comments(text):
    # Drop // comments (incl. /// and //!) and /* */ blocks; keep line count.
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    out = []
    for line in text.split("\n"):
        # naive string awareness: cut at // not inside a "..." literal
        in_str = False
        cut = len(line)
        i = 0
        while i < len(line):
            c = line[i]
            if c == "\\" and in_str:
                i += 2
                continue
            if c == '"':
                in_str = not in_str
            elif not in_str and line.startswith("//", i):
                cut = i
                break
            i += 1
        out.append(line[:cut])
    return out


edges = {}  # (a, b) -> first "file:line"
bad_cli = []
for dirpath, _, files in os.walk(src):
    for f in sorted(files):
        if not f.endswith(".rs"):
            continue
        full = os.path.join(dirpath, f)
        rel = os.path.relpath(full, src)
        mod = module_of(rel)
        if mod is None:
            continue
        with open(full, encoding="utf-8") as fh:
            text = "\n".join(strip_comments(fh.read()))
        found = [(m.start(), m.group(1)) for m in path_re.finditer(text)]
        # `use crate::{a, b::c, ...}` groups, possibly over several lines.
        for g in group_re.finditer(text):
            for item in group_items(text, g.end() - 1):
                name = item.strip().split("::")[0].split(" ")[0]
                if name and name != "self":
                    found.append((g.start(), name))
        for pos, t in found:
            if t == mod:
                continue
            where = f"src/{rel}:{text.count(chr(10), 0, pos) + 1}"
            if t == "cli" and mod != "cli":
                bad_cli.append(where)
            if (mod, t) in ALLOWED_EDGES:
                continue
            edges.setdefault((mod, t), where)

graph = {}
for (a, b) in edges:
    graph.setdefault(a, set()).add(b)

# Tarjan's strongly connected components; report one cycle per component.
index, low, on, stack, sccs = {}, {}, set(), [], []
counter = [0]
sys.setrecursionlimit(10000)


def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
        if w not in index:
            strong(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in sorted(set(graph) | {b for s in graph.values() for b in s}):
    if v not in index:
        strong(v)


def cycle_in(comp):
    # shortest cycle through comp[0] by BFS inside the component
    members = set(comp)
    start = comp[0]
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


failed = False
for where in bad_cli:
    print(f"{where}: references crate::cli from outside src/cli/")
    failed = True
for comp in sccs:
    cyc = cycle_in(comp)
    print("import cycle: " + " -> ".join(cyc))
    if len(comp) > len(cyc) - 1:
        print("  (modules tangled with it: " + ", ".join(comp) + ")")
    for a, b in zip(cyc, cyc[1:]):
        print(f"  {a} -> {b}: {edges[(a, b)]}")
    failed = True
if failed:
    sys.exit(1)
mods = sorted(set(graph) | {b for s in graph.values() for b in s})
print(f"layers ok: {len(mods)} modules, {len(edges)} edges, no cycle, crate::cli used only by src/cli/")
PY
