"""Unit tests that need no server: routing vectors, op ids, request bodies."""

from __future__ import annotations

import asyncio
import json
import os
import unittest

import amends
from amends.routing import check_vectors

ROOT = os.environ.get("AMENDS_REPO_ROOT") or os.path.join(os.path.dirname(__file__), "..", "..", "..")
VECTORS = os.path.join(ROOT, "specs", "vectors", "routing.json")


class OfflineTest(unittest.TestCase):
    def test_routing_vectors(self) -> None:
        self.assertEqual(check_vectors(VECTORS), 0)

    def test_op_ids_are_uuid_v7(self) -> None:
        op_id = amends.new_op_id(ms=0x018BCFE56FD0)
        self.assertRegex(op_id, r"^018bcfe5-6fd0-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
        self.assertNotEqual(amends.new_op_id(), amends.new_op_id())

    def test_routing_keys(self) -> None:
        self.assertEqual(amends.routing_key({"type": "credit", "account": "a", "amount": 1}), "a")
        self.assertEqual(
            amends.routing_key({"type": "claim", "namespace": "n", "key": "k", "owner": "o"}), "n\x1fk"
        )
        self.assertEqual(amends.routing_key({"type": "transfer"}, "id"), "id")
        with self.assertRaises(amends.InvalidRequest):
            amends.routing_key({"type": "tick"})
        with self.assertRaises(amends.InvalidRequest):
            amends.routing_key({"type": "debit"})

    def test_request_bodies(self) -> None:
        request = amends.new_request({"type": "credit", "account": "é", "amount": 1}, "t")
        body = amends.encode_request(request)
        self.assertEqual(json.loads(body), request)
        self.assertIn("é".encode(), body)
        with self.assertRaises(amends.InvalidRequest):
            amends.encode_request(amends.new_request({"type": "credit", "account": "x" * 70000, "amount": 1}))

    def test_partition_count_is_read_as_amends_writes_it(self) -> None:
        # The decimal digits of 1 to 1024 and nothing else, as amends reads it.
        class Entry:
            def __init__(self, value: bytes) -> None:
                self.value = value

        class Bucket:
            def __init__(self, value: bytes) -> None:
                self.entry = Entry(value)

            async def get(self, key: str) -> Entry:
                assert key == "partitions", key
                return self.entry

        class JetStream:
            def __init__(self, value: bytes) -> None:
                self.bucket = Bucket(value)

            async def key_value(self, bucket: str) -> Bucket:
                assert bucket == "AMENDS_META", bucket
                return self.bucket

        def read(value: bytes) -> int:
            return asyncio.run(amends.read_partitions(JetStream(value), "amends"))

        self.assertEqual(read(b"8"), 8)
        self.assertEqual(read(b"1024"), 1024)
        for bad in [b"", b"0", b"1025", b" 8", b"8\n", b"+8", b"08", b"-1", b"8.0", b"\xff"]:
            with self.assertRaises(amends.MetaError, msg=repr(bad)):
                read(bad)

    @unittest.skipUnless(os.environ.get("AMENDS_EXPECT_INSTALLED_IN"), "not run from an install")
    def test_imported_from_the_install(self) -> None:
        where = os.path.realpath(os.environ["AMENDS_EXPECT_INSTALLED_IN"])
        self.assertTrue(os.path.realpath(amends.__file__).startswith(where + os.sep), amends.__file__)


if __name__ == "__main__":
    unittest.main()
