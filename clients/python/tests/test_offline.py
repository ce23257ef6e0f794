"""Unit tests that need no server: routing vectors, op ids, request bodies."""

from __future__ import annotations

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

    @unittest.skipUnless(os.environ.get("AMENDS_EXPECT_INSTALLED_IN"), "not run from an install")
    def test_imported_from_the_install(self) -> None:
        where = os.path.realpath(os.environ["AMENDS_EXPECT_INSTALLED_IN"])
        self.assertTrue(os.path.realpath(amends.__file__).startswith(where + os.sep), amends.__file__)


if __name__ == "__main__":
    unittest.main()
