"""The amends client against a real `amends serve`.

Driven by tests/e2e/python.rs, which starts nats-server and `amends serve`
and sets AMENDS_NATS_URL and AMENDS_PARTITIONS (the serve has a 1 s
JetStream duplicate window). Run by hand:

    AMENDS_NATS_URL=nats://127.0.0.1:4222 AMENDS_PARTITIONS=4 \
        python3 -m unittest discover -s clients/python/tests -v
"""

from __future__ import annotations

import asyncio
import json
import os
import unittest

import amends

URL = os.environ.get("AMENDS_NATS_URL", "")
PARTITIONS = int(os.environ.get("AMENDS_PARTITIONS", "0"))
DUPLICATE_WINDOW_S = 1.0  # tests/e2e support: serve runs with a 1 s window


def fresh(label: str) -> str:
    return f"py-{label}-{os.urandom(4).hex()}"


@unittest.skipUnless(URL, "AMENDS_NATS_URL not set (tests/e2e/python.rs sets it)")
class LiveTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.client = await amends.connect(URL)

    async def asyncTearDown(self) -> None:
        await self.client.close()

    async def decide(self, command: dict, **kw: object) -> amends.Decision:
        request = amends.new_request(command, **kw)  # type: ignore[arg-type]
        return await self.client.submit_and_wait(request, timeout_per_try=2.0, tries=5)

    async def test_reads_the_partition_count_from_the_meta_bucket(self) -> None:
        self.assertEqual(self.client.partitions, PARTITIONS)

    async def test_confirmed_and_rejected_with_reasons(self) -> None:
        account = fresh("acct")
        opened = await self.decide({"type": "open_account", "account": account})
        self.assertTrue(opened.confirmed, opened)
        credited = await self.decide({"type": "credit", "account": account, "amount": 100})
        self.assertEqual((credited.outcome, credited.balance, credited.available), ("confirmed", 100, 100))
        self.assertEqual(credited.partition, amends.partition_of(account, PARTITIONS))
        overdraft = await self.decide({"type": "debit", "account": account, "amount": 150})
        self.assertTrue(overdraft.rejected, overdraft)
        self.assertEqual(
            overdraft.reason, {"code": "insufficient_funds", "available": 100, "floor": 0, "requested": 150}
        )
        user = fresh("user")
        claim = {"type": "claim", "namespace": "username", "key": user, "owner": "ann"}
        self.assertTrue((await self.decide(claim)).confirmed)
        taken = await self.decide(dict(claim, owner="bob"))
        self.assertEqual(taken.reason_code, "already_claimed")
        self.assertEqual(taken.reason and taken.reason.get("owner"), "ann")
        missing = await self.decide({"type": "debit", "account": fresh("none"), "amount": 1})
        self.assertEqual(missing.reason_code, "unknown_account")

    async def test_a_duplicate_gets_the_same_decision(self) -> None:
        account = fresh("dup")
        request = amends.new_request({"type": "open_account", "account": account})
        first = await self.client.submit_and_wait(request, timeout_per_try=2.0, tries=5)
        # Inside JetStream's duplicate window the copy is dropped (duplicate
        # ack) and nobody replies: the status query between tries answers.
        again = await self.client.submit(request)
        self.assertTrue(again.duplicate, again)
        inside = await self.client.submit_and_wait(request, timeout_per_try=0.5, tries=3)
        self.assertEqual(inside, first)
        # After it, the copy reaches the log and amends answers from its
        # dedup record: the original decision, position and log time.
        await asyncio.sleep(DUPLICATE_WINDOW_S + 0.5)
        after = await self.client.submit_and_wait(request, timeout_per_try=2.0, tries=5)
        self.assertEqual(after, first)
        self.assertEqual(after.position, first.position)
        # A different body under the same op id (same partition, once the
        # copy just appended is out of the duplicate window) is a conflict,
        # sent to us only; the status still has the original.
        await asyncio.sleep(DUPLICATE_WINDOW_S + 0.5)
        conflict = dict(request, command={"type": "credit", "account": account, "amount": 1})
        refused = await self.client.submit_and_wait(conflict, timeout_per_try=2.0, tries=3)
        self.assertEqual(refused.reason_code, "op_id_conflict")
        self.assertEqual(await self.client.status(request["op_id"], first.partition), first)

    async def test_resubmission_after_a_lost_reply(self) -> None:
        # The request reaches the log without a reply subject, as if serve
        # had died between its commit and its reply: the decision exists,
        # its reply never comes.
        account = fresh("lost")
        request = amends.new_request({"type": "open_account", "account": account})
        partition = self.client.partition_of(request)
        await self.client.js.publish(
            f"amends.req.{partition}",
            amends.encode_request(request),
            headers={amends.MSG_ID_HEADER: request["op_id"]},
        )
        original = None
        for _ in range(100):
            original = await self.client.status(request["op_id"], partition)
            if original is not None:
                break
            await asyncio.sleep(0.05)
        self.assertIsNotNone(original, "never decided")
        # The resubmission is a JetStream duplicate: no reply, the status
        # query after the first timeout gives the original decision.
        decision = await self.client.submit_and_wait(request, timeout_per_try=0.5, tries=3)
        self.assertEqual(decision, original)
        self.assertTrue(decision.confirmed)

    async def test_submit_then_wait(self) -> None:
        request = amends.new_request({"type": "open_account", "account": fresh("wait")})
        submitted = await self.client.submit(request)
        self.assertEqual(submitted.partition, self.client.partition_of(request))
        self.assertFalse(submitted.duplicate)
        self.assertGreater(submitted.sequence, 0)
        decision = await self.client.wait(request["op_id"], timeout=5.0)
        self.assertTrue(decision.confirmed)
        self.assertEqual(decision.position, submitted.sequence)
        with self.assertRaises(amends.NotSubmitted):
            await self.client.wait(request["op_id"], timeout=0.1)
        with self.assertRaises(amends.NotSubmitted):
            await self.client.wait(amends.new_op_id(), timeout=0.1)

    async def test_status_balance_claim_and_stats(self) -> None:
        account = fresh("q")
        opened = await self.decide({"type": "open_account", "account": account, "ceiling": 1000})
        await self.decide({"type": "credit", "account": account, "amount": 70})
        status = await self.client.status(opened.op_id)  # every partition asked
        self.assertEqual(status, opened)
        self.assertIsNone(await self.client.status(amends.new_op_id(), 0))
        with self.assertRaises(amends.StatusError):
            await self.client.status("not-an-op-id", 0)

        balance = await self.client.balance(account)
        assert balance is not None
        self.assertEqual(
            (balance.account, balance.balance, balance.held, balance.available, balance.floor, balance.ceiling),
            (account, 70, 0, 70, 0, 1000),
        )
        self.assertIsNone(await self.client.balance(fresh("nobody")))

        user = fresh("owner")
        await self.decide({"type": "claim", "namespace": "username", "key": user, "owner": "ann"})
        owner = await self.client.claim_owner("username", user)
        self.assertEqual((owner.claimed, owner.owner, owner.tentative), (True, "ann", False))
        free = await self.client.claim_owner("username", fresh("free"))
        self.assertEqual((free.claimed, free.owner), (False, None))

        stats = await self.client.stats()
        self.assertEqual([s.partition for s in stats], list(range(PARTITIONS)))
        for s in stats:
            self.assertEqual(s.state, "running", s)
            self.assertIsNotNone(s.lag, s)
        self.assertGreaterEqual(stats[opened.partition].applied_position, opened.position)

    async def test_wrong_partition_is_refused(self) -> None:
        # The client never does this; a hand-made publish shows the reason.
        account = fresh("wrong")
        request = amends.new_request({"type": "open_account", "account": account})
        wrong = (self.client.partition_of(request) + 1) % PARTITIONS
        inbox = self.client.nc.new_inbox()
        sub = await self.client.nc.subscribe(inbox)
        await self.client.js.publish(
            f"amends.req.{wrong}",
            amends.encode_request(request),
            headers={amends.MSG_ID_HEADER: request["op_id"], amends.REPLY_TO_HEADER: inbox},
        )
        msg = await sub.next_msg(timeout=5.0)
        decision = amends.Decision.from_json(json.loads(msg.data))
        self.assertEqual((decision.reason_code, decision.partition), ("wrong_partition", wrong))

    async def test_an_apology_is_consumed_from_the_apology_stream(self) -> None:
        account = fresh("sorry")
        topic = "py.tests." + os.urandom(4).hex()
        await self.decide({"type": "open_account", "account": account})
        refused = amends.new_request({"type": "debit", "account": account, "amount": 5})
        submitted = await self.client.submit_optimistic(refused, topic)
        self.assertFalse(submitted.duplicate)
        fine = amends.new_request({"type": "credit", "account": account, "amount": 5})
        await self.client.submit_optimistic(fine, topic)  # confirmed: no apology
        with self.assertRaises(amends.TopicMismatch):
            await self.client.submit_optimistic(dict(refused, apology_topic="other"), topic)

        durable = "py-tests-" + os.urandom(4).hex()
        apologies = self.client.apologies(topic, durable, ack_wait=1.0)
        delivery = await asyncio.wait_for(apologies.__anext__(), timeout=10.0)
        self.assertEqual(delivery.op_id, refused["op_id"])
        self.assertEqual(delivery.topic, topic)
        self.assertEqual(delivery.command, refused["command"])
        self.assertEqual(delivery.decision.reason_code, "insufficient_funds")
        self.assertEqual(delivery.delivered, 1)
        await delivery.ack()
        self.assertIsNone(await apologies.next(timeout=1.5), "acked, and the credit has none")
        await apologies.close()
        # The same durable name resumes after the acknowledged apology.
        again = self.client.apologies(topic, durable)
        self.assertIsNone(await again.next(timeout=1.0))
        await again.close()


if __name__ == "__main__":
    unittest.main()
