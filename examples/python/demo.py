"""Demo of the Python amends client against a running `amends serve`.

Opens an account, credits it, tries an overdraft, claims a username twice
and transfers to a second account twice (a saga), printing each decision as
one JSON line. Exits 0 only if the outcomes are: confirmed, confirmed,
rejected insufficient_funds, confirmed, rejected already_claimed, confirmed,
confirmed, rejected step_refused.

    pip install ./clients/python   # or: PYTHONPATH=clients/python:.tools/pypi/nats-py
    python3 examples/python/demo.py --nats-url nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

try:
    import amends
except ImportError:  # not installed: use the package in this repo
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients", "python"))
    import amends


async def connect(url: str, prefix: str, wait: float) -> amends.Client:
    """Connects, retrying until the deployment (its meta bucket) exists."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await amends.connect(url, prefix)
        except amends.AmendsError as e:
            if time.monotonic() >= deadline:
                raise SystemExit(f"demo: no amends deployment at {url}: {e!r}")
            await asyncio.sleep(0.2)


async def run(url: str, prefix: str, wait: float) -> int:
    client = await connect(url, prefix, wait)
    suffix = os.urandom(4).hex()  # fresh names, so the demo can run again
    account = f"py-demo-{suffix}"
    user = f"py-user-{suffix}"
    steps = [
        ("open account", {"type": "open_account", "account": account}, ("confirmed", None)),
        ("credit 100", {"type": "credit", "account": account, "amount": 100}, ("confirmed", None)),
        ("debit 150", {"type": "debit", "account": account, "amount": 150}, ("rejected", "insufficient_funds")),
        ("claim as ann", {"type": "claim", "namespace": "username", "key": user, "owner": "ann"}, ("confirmed", None)),
        ("claim as bob", {"type": "claim", "namespace": "username", "key": user, "owner": "bob"}, ("rejected", "already_claimed")),
        ("open 2nd account", {"type": "open_account", "account": account + "-b"}, ("confirmed", None)),
        # Sagas: routed by their op id; the decision comes when both steps are done.
        ("transfer 30", {"type": "transfer", "from": account, "to": account + "-b", "amount": 30}, ("confirmed", None)),
        ("transfer 500", {"type": "transfer", "from": account, "to": account + "-b", "amount": 500}, ("rejected", "step_refused")),
    ]
    ok = True
    try:
        print(f"partitions: {client.partitions}")
        for label, command, (want_outcome, want_code) in steps:
            request = amends.new_request(command)
            decision = await client.submit_and_wait(request, timeout_per_try=2.0, tries=5)
            good = decision.outcome == want_outcome and decision.reason_code == want_code
            ok &= good
            print(f"{label}: {'ok' if good else 'UNEXPECTED'} {json.dumps(decision.raw, sort_keys=True)}")
    finally:
        await client.close()
    print("all outcomes as expected" if ok else "some outcomes were unexpected")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="amends Python client demo")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--prefix", default="amends")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the deployment")
    args = parser.parse_args()
    return asyncio.run(run(args.nats_url, args.prefix, args.wait))


if __name__ == "__main__":
    sys.exit(main())
