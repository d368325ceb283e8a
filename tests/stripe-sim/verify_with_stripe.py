"""Verifies loraplane notifications with the official `stripe` package, as a storefront would.

Reads one JSON object per line on stdin: {"secret", "header", "payload"}; prints each event's
type, or exits non-zero with the library's error. Run by `Storefront::verify_with_stripe_package`
with the interpreter `make bootstrap` installs (.tools/venv)."""

import json
import sys

import stripe

for line in sys.stdin:
    d = json.loads(line)
    event = stripe.Webhook.construct_event(d["payload"], d["header"], d["secret"])
    print(event["type"])
