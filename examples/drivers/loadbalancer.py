#!/usr/bin/env python3
"""A driver for the `network` service's load balancers, for the worker's exec driver.

The worker runs it once per operation: the dispatch (the operation, the resource's
spec at its generation) arrives as JSON on stdin; the observed status goes to stdout as
JSON; exit 0 is success, 75 a transient failure (retried), anything else a permanent
one (stderr says why). It must be idempotent per operation: this one only computes the
status from its input. A real driver would call the load balancer's API here.
"""
import hashlib
import json
import sys

op = json.load(sys.stdin)
if op["action"] == "delete":
    print("{}")
    sys.exit(0)
spec = op["spec"]
digest = hashlib.sha256(op["resource_id"].encode()).digest()
status = {
    "address": f"10.200.{digest[0]}.{digest[1] % 254 + 1}",
    "port": spec["port"],
    "draining": op["action"] == "drain",
    "generation": op["generation"],
}
json.dump(status, sys.stdout)
