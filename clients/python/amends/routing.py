"""Routing (specs/routing.md): FNV-1a 64 of the routing key's UTF-8 bytes,
then jump consistent hash with its f64 step.

Self-check against the published vectors:

    python3 -m amends --check-vectors specs/vectors/routing.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Mapping, Optional

from .errors import InvalidRequest

MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
JUMP_MUL = 2862933555777941757

PARTITIONS_MAX = 1024

ACCOUNT_COMMANDS = frozenset({"open_account", "credit", "debit", "hold", "post", "void"})
CLAIM_COMMANDS = frozenset({"claim", "release"})
SAGA_COMMANDS = frozenset({"transfer", "saga"})


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


def claim_routing_key(namespace: str, key: str) -> str:
    """The routing key of a claim: namespace, U+001F, key."""
    return namespace + "\x1f" + key


def routing_key(command: Mapping[str, Any], op_id: Optional[str] = None) -> str:
    """The routing key of a request: the account, namespace U+001F key, or,
    for a saga (`transfer`, `saga`), its op id in canonical text."""
    kind = command.get("type")
    if kind in SAGA_COMMANDS:
        if op_id is None:
            raise InvalidRequest("a saga is routed by its op id")
        return op_id
    try:
        if kind in ACCOUNT_COMMANDS:
            return str(command["account"])
        if kind in CLAIM_COMMANDS:
            return claim_routing_key(str(command["namespace"]), str(command["key"]))
    except KeyError as e:
        raise InvalidRequest(f"a {kind} command needs the field {e.args[0]!r}") from None
    raise InvalidRequest(f"no routing key for command type {kind!r}")


def check_vectors(path: str) -> int:
    """Checks fnv1a_64 and every partition of every vector; returns failures."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    failures = 0
    checked = 0
    for v in doc["vectors"]:
        key = v["key"]
        if v["kind"] == "claim" and key != claim_routing_key(v["namespace"], v["claim_key"]):
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check-vectors", metavar="ROUTING_JSON", required=True)
    args = parser.parse_args()
    return 1 if check_vectors(args.check_vectors) else 0


if __name__ == "__main__":
    sys.exit(main())
