#!/bin/sh
# vdrep notify_command: POST each event (JSON on stdin) to a webhook.
#
#   [site]
#   notify_command = "/usr/share/vdrep/notify-webhook.sh https://hooks.example.com/vdrep"
#
# vdrep runs it once per event with the event's JSON line on stdin and
# VDREP_EVENT, VDREP_VM, VDREP_EVENT_SEQ in the environment; it is killed
# after notify_timeout. Extra headers (e.g. a token) can be given with
# VDREP_WEBHOOK_HEADER="Authorization: Bearer ...".
# Exit status: curl's (non-zero: vdrep logs the failure; it is not retried).
set -eu
url="${1:?usage: notify-webhook.sh URL}"
if [ -n "${VDREP_WEBHOOK_HEADER:-}" ]; then
    exec curl --silent --show-error --fail --max-time 8 \
        -H 'Content-Type: application/json' -H "$VDREP_WEBHOOK_HEADER" \
        --data-binary @- "$url"
fi
exec curl --silent --show-error --fail --max-time 8 \
    -H 'Content-Type: application/json' --data-binary @- "$url"
