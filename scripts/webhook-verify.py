"""Verifies recorded webhook deliveries with the Standard Webhooks reference library.

Reads a JSON file: [{"secret": "whsec_…", "headers": {...}, "body": "..."}, …] and checks
each delivery's signature with `standardwebhooks.Webhook(secret).verify(body, headers)`,
an implementation independent of the gateway's. Exits non-zero on the first failure.
"""
import json
import sys

from standardwebhooks.webhooks import Webhook


def main(path: str) -> int:
    deliveries = json.load(open(path))
    for i, d in enumerate(deliveries):
        try:
            Webhook(d["secret"]).verify(d["body"], d["headers"])
        except Exception as e:  # noqa: BLE001 - report any failure with its delivery
            print(f"delivery {i} ({d['headers'].get('webhook-id')}): {e!r}", file=sys.stderr)
            return 1
    print(f"{len(deliveries)} deliveries verified")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
