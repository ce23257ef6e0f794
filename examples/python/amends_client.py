"""A minimal amends client in Python 3.11, written from specs/protocol.md.

Standard library plus nats-py only. It routes an operation to its partition
(FNV-1a 64 + jump consistent hash, specs/routing.md), makes UUID v7 op ids,
reads the partition count from the `<PREFIX>_META` key-value bucket, and
submits an operation and waits for its decision, resubmitting the same
operation (same op id, body, subject, `Nats-Msg-Id` and reply subject) when
a try times out.

Self-check of the routing against the published vectors:

    python3 amends_client.py --check-vectors specs/vectors/routing.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from typing import Any

MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
JUMP_MUL = 2862933555777941757

REPLY_TO_HEADER = "Amends-Reply-To"
MSG_ID_HEADER = "Nats-Msg-Id"
PARTITIONS_KEY = "partitions"

ACCOUNT_COMMANDS = {"open_account", "credit", "debit", "hold", "post", "void"}
CLAIM_COMMANDS = {"claim", "release"}

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


# --- routing (specs/routing.md) ----------------------------------------------


def fnv1a_64(data: bytes) -> int:
    """FNV-1a 64 of `data`, as an unsigned 64-bit integer."""
    h = FNV_OFFSET
    for c in data:
        h ^= c
        h = (h * FNV_PRIME) & MASK64
    return h


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach 2014), with the f64 step."""
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    key &= MASK64
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * JUMP_MUL + 1) & MASK64
        # Both operands are exact in binary64; Python floats are binary64
        # with round-to-nearest-even, and int() truncates toward zero.
        j = int(float(b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def partition_of(routing_key: str, partitions: int) -> int:
    """The partition of a routing key among `partitions` partitions."""
    return jump_hash(fnv1a_64(routing_key.encode("utf-8")), partitions)


SAGA_COMMANDS = {"transfer", "saga"}


def routing_key(command: dict[str, Any], op_id: str | None = None) -> str:
    """The routing key of a request: the account, namespace U+001F key, or,
    for a saga (`transfer`, `saga`), its op id in canonical text."""
    kind = command.get("type")
    if kind in SAGA_COMMANDS:
        if op_id is None:
            raise ValueError("a saga is routed by its op id")
        return op_id
    if kind in ACCOUNT_COMMANDS:
        return command["account"]
    if kind in CLAIM_COMMANDS:
        return command["namespace"] + "\x1f" + command["key"]
    raise ValueError(f"no routing key for command type {kind!r}")


# --- op ids (specs/protocol.md, "Operation ids") -------------------------------


def new_op_id(ms: int | None = None) -> str:
    """A UUID v7 in canonical text: 48-bit ms timestamp, random rest."""
    if ms is None:
        ms = time.time_ns() // 1_000_000
    b = bytearray(os.urandom(16))
    b[0:6] = (ms & ((1 << 48) - 1)).to_bytes(6, "big")
    b[6] = 0x70 | (b[6] & 0x0F)
    b[8] = 0x80 | (b[8] & 0x3F)
    h = b.hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def new_request(command: dict[str, Any], apology_topic: str | None = None) -> dict[str, Any]:
    """A request with a fresh op id, made once per operation."""
    request: dict[str, Any] = {"op_id": new_op_id(), "command": command}
    if apology_topic is not None:
        request["apology_topic"] = apology_topic
    return request


def meta_bucket(prefix: str) -> str:
    """`<PREFIX>_META`: upper-cased, non-alphanumerics replaced by `_`."""
    upper = "".join(c if c.isascii() and c.isalnum() else "_" for c in prefix.upper())
    return f"{upper}_META"


# --- the client ------------------------------------------------------------------


class NoDecision(Exception):
    """Every try timed out without a decision."""


class AmendsClient:
    """A connection to an amends deployment."""

    def __init__(self, nc: Any, prefix: str, partitions: int) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.partitions = partitions

    @classmethod
    async def connect(cls, url: str, prefix: str = "amends") -> "AmendsClient":
        """Connects and reads the partition count from `<PREFIX>_META`."""
        import nats

        if not _PREFIX_RE.match(prefix) or len(prefix.encode()) > 64:
            raise ValueError(f"invalid subject prefix {prefix!r}")
        nc = await nats.connect(url, name="amends-python")
        try:
            partitions = await read_partitions(nc.jetstream(), prefix)
        except BaseException:
            await nc.close()
            raise
        return cls(nc, prefix, partitions)

    async def close(self) -> None:
        await self.nc.close()

    def subject_of(self, request: dict[str, Any]) -> str:
        p = partition_of(routing_key(request["command"], request["op_id"]), self.partitions)
        return f"{self.prefix}.req.{p}"

    async def submit_and_wait(
        self, request: dict[str, Any], timeout: float = 2.0, tries: int = 5
    ) -> dict[str, Any]:
        """Publishes `request` and waits up to `timeout` seconds per try for
        its decision, resubmitting the same operation up to `tries` times.

        The body, subject, `Nats-Msg-Id` and reply subject are the same for
        every try, so that a reply to any copy that reached the log arrives.
        """
        import nats.errors

        body = json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        subject = self.subject_of(request)
        op_id = request["op_id"]
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        headers = {MSG_ID_HEADER: op_id, REPLY_TO_HEADER: inbox}
        last_error: BaseException | None = None
        try:
            for attempt in range(max(tries, 1)):
                if attempt:
                    await asyncio.sleep(min(0.05 * 2**attempt, 1.0))  # back off
                try:
                    await self.js.publish(subject, body, timeout=timeout, headers=headers)
                except Exception as e:  # no ack: resubmit below
                    last_error = e
                    continue
                deadline = asyncio.get_running_loop().time() + timeout
                while True:
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        break
                    try:
                        msg = await sub.next_msg(timeout=left)
                    except nats.errors.TimeoutError:
                        break
                    try:
                        decision = json.loads(msg.data)
                    except ValueError:
                        continue
                    if isinstance(decision, dict) and decision.get("op_id") == op_id and "outcome" in decision:
                        return decision
            raise NoDecision(f"op {op_id}: no decision after {tries} tries ({last_error or 'timed out'})")
        finally:
            await sub.unsubscribe()


async def read_partitions(js: Any, prefix: str) -> int:
    """The partition count recorded under `partitions` in `<PREFIX>_META`."""
    kv = await js.key_value(meta_bucket(prefix))
    entry = await kv.get(PARTITIONS_KEY)
    text = (entry.value or b"").decode("ascii").strip()
    n = int(text)
    if not 1 <= n <= 1024:
        raise ValueError(f"{meta_bucket(prefix)}: partitions = {text!r} out of range")
    return n


# --- vectors self-check --------------------------------------------------------------


def check_vectors(path: str) -> int:
    """Checks fnv1a_64 and every partition of every vector; returns failures."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    failures = 0
    checked = 0
    for v in doc["vectors"]:
        key = v["key"]
        if v["kind"] == "claim" and key != v["namespace"] + "\x1f" + v["claim_key"]:
            print(f"FAIL {key!r}: claim key is not namespace U+001F key", file=sys.stderr)
            failures += 1
        got = f"0x{fnv1a_64(key.encode('utf-8')):016x}"
        if got != v["fnv1a_64"]:
            print(f"FAIL {key!r}: fnv1a_64 {got} != {v['fnv1a_64']}", file=sys.stderr)
            failures += 1
        for n, want in v["partitions"].items():
            checked += 1
            p = partition_of(key, int(n))
            if p != want:
                print(f"FAIL {key!r}: N={n} partition {p} != {want}", file=sys.stderr)
                failures += 1
    print(f"{len(doc['vectors'])} vectors, {checked} partitions checked, {failures} failures")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-vectors", metavar="ROUTING_JSON", required=True)
    args = parser.parse_args()
    return 1 if check_vectors(args.check_vectors) else 0


if __name__ == "__main__":
    sys.exit(main())
