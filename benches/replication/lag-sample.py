"""Sample a VM's replication lag every 0.5 s (the RPO measurement of
scripts/bench-replication.sh and scripts/bench-objectstore.sh).

    python3 lag-sample.py [--relative] VDREP MOUNT_DIR VM SECS > lag.tsv

One line per sample: unix time (--relative: seconds since the start),
lag_secs (empty while none), bytes_pending, state; a failed `vdrep status --json` gives an `error:` state.
"""
import json
import subprocess
import sys
import time

args = sys.argv[1:]
relative = args[:1] == ["--relative"]
if relative:
    args = args[1:]
vdrep, d, vm, secs = args[0], args[1], args[2], float(args[3])
t0 = time.time()
t_end = t0 + secs
nxt = t0


def stamp():
    return time.time() - t0 if relative else time.time()


while time.time() < t_end:
    try:
        s = json.loads(subprocess.run([vdrep, "status", d, "--json"], capture_output=True, text=True, timeout=5).stdout)
        v = [r for r in s.get("replication", []) if r["vm"] == vm][0]
        lag = v.get("lag_secs")
        print(f"{stamp():.2f}\t{'' if lag is None else f'{lag:.3f}'}\t{v.get('bytes_pending', 0)}\t{v.get('state')}", flush=True)
    except Exception as e:
        print(f"{stamp():.2f}\t\t\terror:{e}", flush=True)
    nxt += 0.5
    time.sleep(max(0.0, nxt - time.time()))
