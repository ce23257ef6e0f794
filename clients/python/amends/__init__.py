"""amends-client: the Python client of amends (specs/protocol.md).

    import asyncio, amends

    async def main():
        client = await amends.connect("nats://127.0.0.1:4222")
        request = amends.new_request({"type": "credit", "account": "alice", "amount": 5})
        decision = await client.submit_and_wait(request, timeout_per_try=2.0, tries=5)
        print(decision.outcome, decision.reason_code)
        await client.close()

    asyncio.run(main())
"""

from .apologies import Apologies, Delivery
from .client import (
    MSG_ID_HEADER,
    REPLY_TO_HEADER,
    REQUEST_BYTES_MAX,
    Client,
    connect,
    encode_request,
    new_request,
    read_partitions,
)
from .errors import (
    AmendsError,
    ApologyError,
    Closed,
    ConnectError,
    InvalidRequest,
    MetaError,
    NoDecision,
    NotSubmitted,
    PublishError,
    QueryError,
    StatusError,
    TopicMismatch,
)
from .ids import new_op_id
from .routing import claim_routing_key, fnv1a_64, jump_hash, partition_of, routing_key
from .types import Balance, ClaimOwner, Decision, PartitionStats, Submitted

__version__ = "0.1.0"

__all__ = [
    "AmendsError",
    "Apologies",
    "ApologyError",
    "Balance",
    "ClaimOwner",
    "Client",
    "Closed",
    "ConnectError",
    "Decision",
    "Delivery",
    "InvalidRequest",
    "MSG_ID_HEADER",
    "MetaError",
    "NoDecision",
    "NotSubmitted",
    "PartitionStats",
    "PublishError",
    "QueryError",
    "REPLY_TO_HEADER",
    "REQUEST_BYTES_MAX",
    "StatusError",
    "Submitted",
    "TopicMismatch",
    "claim_routing_key",
    "connect",
    "encode_request",
    "fnv1a_64",
    "jump_hash",
    "new_op_id",
    "new_request",
    "partition_of",
    "read_partitions",
    "routing_key",
]
