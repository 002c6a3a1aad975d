#!/usr/bin/env bash
# vdrep application-consistency hook for plain QEMU guests: talks to the
# QEMU guest agent over its host-side socket, e.g. a guest started with
#
#   -chardev socket,path=/run/vdrep-qga/web01.sock,server=on,wait=off,id=qga0
#   -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
#
#   vdrep protect web01 --app-hook /path/to/app-hook-qga.sh ...
#
# vdrep runs it as `app-hook-qga.sh freeze|thaw VM`. The socket is
# $VDREP_QGA_SOCKET, else /run/vdrep-qga/VM.sock. It first syncs the
# channel (guest-sync with a random id, discarding stale replies), then sends
# guest-fsfreeze-freeze or guest-fsfreeze-thaw and fails on an error reply.
# A freeze that froze no file system fails too: the point would hold
# nothing quiesced, so vdrep records it crash-consistent (and still thaws).
set -euo pipefail
phase="${1:-}"; vm="${2:-}"
case "$phase" in
    freeze) cmd=guest-fsfreeze-freeze ;;
    thaw)   cmd=guest-fsfreeze-thaw ;;
    *) echo "usage: $0 freeze|thaw VM" >&2; exit 2 ;;
esac
sock="${VDREP_QGA_SOCKET:-/run/vdrep-qga/$vm.sock}"
exec python3 - "$sock" "$cmd" <<'PY'
import json, random, socket, sys
path, cmd = sys.argv[1], sys.argv[2]
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
except OSError as e:
    sys.exit(f"app-hook-qga: cannot reach the guest agent at {path}: {e}")
f = s.makefile("rwb", buffering=0)
def send(obj):
    f.write(json.dumps(obj).encode() + b"\n")
def reply():
    while True:
        line = f.readline()
        if not line:
            sys.exit("app-hook-qga: the guest agent closed the connection")
        line = line.strip(b"\xff \r\n")
        if not line:
            continue
        try:
            return json.loads(line)
        except ValueError:
            continue
token = random.randrange(1, 2**31)
send({"execute": "guest-sync", "arguments": {"id": token}})
while reply().get("return") != token:
    pass
send({"execute": cmd})
r = reply()
if "error" in r:
    sys.exit(f"app-hook-qga: {cmd}: {r['error'].get('desc', r['error'])}")
if cmd == "guest-fsfreeze-freeze" and r.get("return") == 0:
    sys.exit("app-hook-qga: the guest agent froze no file system (is the "
             "guest's data on a mounted file system the agent can freeze?); "
             "this point is not app-consistent")
print(f"{cmd}: {r.get('return')}")
PY
