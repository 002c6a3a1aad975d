#!/usr/bin/env bash
# Report every prerequisite of vdrep's demo, tests and benchmarks with its
# version, or MISSING and the package that provides it. Exit 1 if any is
# missing, or if the disk has too little free space for the build and the
# tests (VDREP_MIN_FREE_GIB). .ci/run runs it right after installing them.
#
#   scripts/check-prereqs.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
rc=0
echo "vdrep prerequisites:"
if vdrep_prereq_report; then
    echo "all present"
else
    echo "check-prereqs: some prerequisites are missing; install them with: sudo bash .ci/run  (or the packages named above)" >&2
    rc=1
fi
echo "disk space:"
vdrep_check_space || rc=1
exit "$rc"
