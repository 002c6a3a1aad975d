#!/usr/bin/env bash
# The benchmarks' test disks, made once and reused (scripts/bench-replication.sh,
# scripts/bench-objectstore.sh):
#
#   scripts/bench-images.sh DIR SIZE [random] [ext4]
#
# DIR/random.img: SIZE bytes of random data.
# DIR/ext4.img:   an ext4 file system of SIZE, ~FILL_PCT % (default 20) full:
#                 half incompressible files (binaries, media), half
#                 compressible text (logs; lz4 gets ~3-4x). Sparse elsewhere.
# An image is made only when DIR/<kind>.ok is absent. Needs root (loop mount)
# for ext4.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 DIR SIZE [random] [ext4]" >&2; exit 2; }
DIR="$1" SIZE="$2"; shift 2
[[ $# -gt 0 ]] || set -- random ext4
FILL_PCT="${FILL_PCT:-20}"
SIZE_BYTES="$(numfmt --from=iec "${SIZE%B}")"
say() { printf '[bench-images %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
mkdir -p "$DIR"
LOOPMNT=""
trap '[[ -n "$LOOPMNT" ]] && { mountpoint -q "$LOOPMNT" && umount "$LOOPMNT"; rmdir "$LOOPMNT"; }' EXIT

for kind in "$@"; do
    [[ -f "$DIR/$kind.ok" ]] && continue
    case "$kind" in
    random)
        say "creating $DIR/random.img ($SIZE of random data)"
        head -c "$SIZE_BYTES" /dev/urandom >"$DIR/random.img"
        ;;
    ext4)
        say "creating $DIR/ext4.img (ext4, $SIZE, ~$FILL_PCT% full: half random, half compressible files)"
        rm -f "$DIR/ext4.img"
        truncate -s "$SIZE_BYTES" "$DIR/ext4.img"
        mkfs.ext4 -q -F "$DIR/ext4.img"
        LOOPMNT="$(mktemp -d "${TMPDIR:-/tmp}/vdrep-bench-images.XXXXXX")"
        mount -o loop "$DIR/ext4.img" "$LOOPMNT"
        python3 - "$LOOPMNT" "$((SIZE_BYTES * FILL_PCT / 100))" <<'PY'
import os, random, sys
root, total = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
words = ("vdrep cycle cut block dirty replica receiver sender quic tls ack apply fsync "
         "vm disk image kernel fuse write read error warning info debug sector extent").split()
done, i = 0, 0
os.makedirs(f"{root}/bin", exist_ok=True); os.makedirs(f"{root}/log", exist_ok=True)
while done < total:
    n = min(rnd.randint(64 << 10, 16 << 20), total - done)
    if i % 2 == 0:   # incompressible (binaries, media, compressed archives)
        with open(f"{root}/bin/blob{i:05d}", "wb") as f:
            f.write(os.urandom(n))
    else:            # compressible (logs, text): lz4 gets ~3-4x
        lines, size = [], 0
        while size < n:
            l = f"2026-11-22T{rnd.randint(0,23):02d}:{rnd.randint(0,59):02d}:{rnd.randint(0,59):02d}.{rnd.randint(0,999999):06d} " \
                f"{rnd.choice(words).upper()} {' '.join(rnd.choice(words) for _ in range(rnd.randint(4,12)))} id={rnd.randint(0,1<<32)}\n"
            lines.append(l); size += len(l)
        with open(f"{root}/log/log{i:05d}.txt", "w") as f:
            f.write("".join(lines)[:n])
    done += n; i += 1
PY
        umount "$LOOPMNT"; rmdir "$LOOPMNT"; LOOPMNT=""
        ;;
    *) echo "unknown image kind $kind (random, ext4)" >&2; exit 2 ;;
    esac
    touch "$DIR/$kind.ok"
done
