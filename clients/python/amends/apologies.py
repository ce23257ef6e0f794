"""The apology consumer (specs/protocol.md, "The apology").

Apologies are read through a durable JetStream pull consumer on the
`<PREFIX>_APOLOGY` stream, filtered to `<prefix>.apology.<topic>`, **at
least once**: an apology comes again until it is acknowledged (after the
ack wait, or to a consumer created again under the same durable name). Make
amends idempotently, keyed by `Delivery.op_id`.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .errors import ApologyError
from .types import Decision

if TYPE_CHECKING:
    from .client import Client

DURABLE_NAME_BYTES_MAX = 128


class Delivery:
    """One apology with its acknowledgement handle."""

    def __init__(self, apology: Dict[str, Any], msg: Any) -> None:
        self.apology = apology
        """The apology object: `topic`, `command`, `decision`."""
        self.decision = Decision.from_json(apology["decision"])
        self._msg = msg

    @property
    def op_id(self) -> str:
        """The refused operation's op id: the key to deduplicate amends by."""
        return self.decision.op_id

    @property
    def topic(self) -> str:
        return str(self.apology["topic"])

    @property
    def command(self) -> Dict[str, Any]:
        return dict(self.apology["command"])

    @property
    def delivered(self) -> Optional[int]:
        """How many times it was delivered, this time included."""
        try:
            return int(self._msg.metadata.num_delivered)
        except Exception:
            return None

    async def ack(self, timeout: float = 2.0) -> None:
        """Acknowledges it and waits for JetStream's confirmation: once this
        returns, it is never delivered to this durable consumer again."""
        try:
            await self._msg.ack_sync(timeout=timeout)
        except Exception as e:
            raise ApologyError(f"ack of the apology of {self.op_id} failed: {e!r}") from e

    async def nak(self) -> None:
        """Asks for it to be delivered again now."""
        try:
            await self._msg.nak()
        except Exception as e:
            raise ApologyError(f"nak of the apology of {self.op_id} failed: {e!r}") from e

    def __repr__(self) -> str:
        return f"Delivery(op_id={self.op_id!r}, topic={self.topic!r}, reason={self.decision.reason!r})"


class Apologies:
    """An async iterator of `Delivery`s; it never ends by itself.

    `__anext__` raises `ApologyError` for a message that is not a readable
    apology (it is terminated, never delivered again) or a failed pull; the
    iterator stays usable after it. `next(timeout)` is one step with a
    deadline (`None` when nothing came).
    """

    def __init__(self, client: "Client", topic: str, durable: str, ack_wait: float, batch: int) -> None:
        if not durable or len(durable.encode()) > DURABLE_NAME_BYTES_MAX or not all(
            c.isascii() and (c.isalnum() or c in "_-") for c in durable
        ):
            raise ApologyError(
                f"invalid durable name {durable!r}: 1 to {DURABLE_NAME_BYTES_MAX} of A-Z a-z 0-9 _ -"
            )
        self._client = client
        self.topic = topic
        self.durable = durable
        self._ack_wait = ack_wait
        self._batch = max(batch, 1)
        self._sub: Any = None
        self._buffer: List[Any] = []

    async def _subscribe(self) -> Any:
        if self._sub is None:
            from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

            from .client import stream_name

            stream = stream_name(self._client.prefix, "APOLOGY")
            subject = f"{self._client.prefix}.apology.{self.topic}"
            config = ConsumerConfig(
                durable_name=self.durable,
                description=f"amends apologies of {self.topic}",
                filter_subject=subject,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._ack_wait,
            )
            try:
                self._sub = await self._client.js.pull_subscribe(
                    subject, durable=self.durable, stream=stream, config=config
                )
            except Exception as e:
                raise ApologyError(f"consumer {self.durable} on {stream}: {e!r}") from e
        return self._sub

    async def next(self, timeout: float = 5.0) -> Optional[Delivery]:
        """The next apology, or None if none came within `timeout`."""
        import nats.errors

        if not self._buffer:
            sub = await self._subscribe()
            try:
                self._buffer = list(await sub.fetch(self._batch, timeout=timeout))
            # nats-py 2.16 raises its own TimeoutError from some fetch paths
            # and asyncio's from others (`_fetch_n` when the pull expires).
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                return None
            except Exception as e:
                raise ApologyError(f"pull from {self.durable} failed: {e!r}") from e
            if not self._buffer:
                return None
        msg = self._buffer.pop(0)
        try:
            apology = json.loads(msg.data)
            return Delivery(apology, msg)
        except (ValueError, KeyError, TypeError) as e:
            try:
                await msg.term()  # delivering it again would not make it one
            except Exception:
                pass
            raise ApologyError(f"unreadable apology on {msg.subject}: {e!r}") from e

    def __aiter__(self) -> "Apologies":
        return self

    async def __anext__(self) -> Delivery:
        while True:
            delivery = await self.next(timeout=5.0)
            if delivery is not None:
                return delivery

    async def close(self) -> None:
        """Stops pulling (the durable consumer and its position stay)."""
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
