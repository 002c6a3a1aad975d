#!/usr/bin/env bash
# vdrep application-consistency hook for libvirt guests running the QEMU
# guest agent (qemu-guest-agent in the guest, an org.qemu.guest_agent.0
# channel in the domain XML):
#
#   vdrep protect VM --app-hook /path/to/app-hook-virsh.sh --app-every 1h ...
#
# vdrep runs it as `app-hook-virsh.sh freeze|thaw VM`. The libvirt domain
# is VM unless VDREP_DOMAIN names another; VIRSH_URI picks the connection
# (default: virsh's own default, qemu:///system as root).
set -euo pipefail
phase="${1:-}"
dom="${VDREP_DOMAIN:-${2:-}}"
[[ -n "$dom" ]] || { echo "usage: $0 freeze|thaw DOMAIN" >&2; exit 2; }
virsh=(virsh)
[[ -n "${VIRSH_URI:-}" ]] && virsh+=(-c "$VIRSH_URI")
# A freeze that froze no file system ("Froze 0 filesystem(s)") fails: the
# point would hold nothing quiesced, so vdrep records it crash-consistent
# (and still runs thaw).
case "$phase" in
    freeze)
        out="$("${virsh[@]}" domfsfreeze "$dom")"
        echo "$out"
        if [[ "$out" =~ Froze\ 0\ filesystem ]]; then
            echo "$0: the guest agent of $dom froze no file system (is the guest's data on a mounted file system the agent can freeze?); this point is not app-consistent" >&2
            exit 1
        fi
        ;;
    thaw)   exec "${virsh[@]}" domfsthaw "$dom" ;;
    *) echo "$0: unknown phase '$phase' (freeze|thaw)" >&2; exit 2 ;;
esac
