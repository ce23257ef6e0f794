"""The client: connect, submit, wait, resubmit, and the query endpoints
(specs/protocol.md: "Subjects", "Headers", "Timeouts and resubmission",
"Queries")."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .errors import (
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
from .routing import PARTITIONS_MAX, claim_routing_key, partition_of, routing_key
from .types import Balance, ClaimOwner, Decision, PartitionStats, Submitted

MSG_ID_HEADER = "Nats-Msg-Id"
REPLY_TO_HEADER = "Amends-Reply-To"
PARTITIONS_KEY = "partitions"
REQUEST_BYTES_MAX = 65536
DEFAULT_TIMEOUT = 2.0

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

Request = Mapping[str, Any]
"""A request body: `{"op_id": ..., "command": {...}, "apology_topic": ...}`."""


def new_request(command: Mapping[str, Any], apology_topic: Optional[str] = None) -> Dict[str, Any]:
    """A request with a fresh op id: make it once per operation and keep it
    for every resubmission."""
    request: Dict[str, Any] = {"op_id": new_op_id(), "command": dict(command)}
    if apology_topic is not None:
        request["apology_topic"] = apology_topic
    return request


def encode_request(request: Request) -> bytes:
    """The wire body of a request: compact UTF-8 JSON, refused over the
    protocol's size limit. The same request always encodes the same."""
    if not isinstance(request.get("op_id"), str):
        raise InvalidRequest("a request needs an op_id (see new_op_id)")
    body = json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > REQUEST_BYTES_MAX:
        raise InvalidRequest(
            f"op {request['op_id']}: body of {len(body)} bytes is over {REQUEST_BYTES_MAX}"
        )
    return body


def check_prefix(prefix: str) -> str:
    """The prefix, if valid: dot-separated tokens of A-Z a-z 0-9 _ -, at
    most 64 bytes."""
    if not _PREFIX_RE.match(prefix) or len(prefix.encode()) > 64:
        raise ConnectError(f"invalid subject prefix {prefix!r}")
    return prefix


def stream_name(prefix: str, suffix: str) -> str:
    """`<PREFIX>_<suffix>`: upper-cased, non-alphanumerics replaced by `_`."""
    upper = "".join(c if c.isascii() and c.isalnum() else "_" for c in prefix.upper())
    return f"{upper}_{suffix}"


class _Slot:
    """One operation in flight: the waits pending, or a decision that came
    while nobody waited (the next wait takes it)."""

    __slots__ = ("waiters", "decision")

    def __init__(self) -> None:
        self.waiters: List["asyncio.Future[Decision]"] = []
        self.decision: Optional[Decision] = None


class Client:
    """A connection to an amends deployment. Make one with `connect`."""

    def __init__(self, nc: Any, prefix: str, partitions: int) -> None:
        self.nc = nc
        """The nats-py connection."""
        self.js = nc.jetstream()
        self.prefix = prefix
        self.partitions = partitions
        self._inbox = nc.new_inbox()
        self._pending: Dict[str, _Slot] = {}
        self._sub: Any = None
        self._closed = False

    async def _start(self) -> None:
        self._sub = await self.nc.subscribe(self._inbox + ".*", cb=self._on_reply)
        # The server has the subscription before any request names it.
        await self.nc.flush()

    async def close(self) -> None:
        """Closes the connection; pending waits end with `Closed`."""
        self._closed = True
        for slot in self._pending.values():
            for w in slot.waiters:
                if not w.done():
                    w.set_exception(Closed("client closed"))
        self._pending.clear()
        await self.nc.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- routing -----------------------------------------------------------

    def partition_of(self, request: Request) -> int:
        """The partition that owns `request` (a saga's is its op id's)."""
        command = request.get("command")
        if not isinstance(command, Mapping):
            raise InvalidRequest("a request needs a command object")
        return partition_of(routing_key(command, request.get("op_id")), self.partitions)

    def new_saga_op_id(self, routing_key: str) -> str:
        """A new op id for a saga that places it on the partition of
        `routing_key` (for a transfer, the `from` account): fewer appends."""
        target = partition_of(routing_key, self.partitions)
        while True:
            op_id = new_op_id()
            if partition_of(op_id, self.partitions) == target:
                return op_id

    def _reply_subject(self, op_id: str) -> str:
        # Fixed for the life of the client: every resubmission names it.
        return f"{self._inbox}.{op_id}"

    # --- submit and wait ---------------------------------------------------

    async def submit(self, request: Request, timeout: float = DEFAULT_TIMEOUT) -> Submitted:
        """Publishes `request` to its partition's log and returns once
        JetStream acknowledged it. The decision comes to this client's inbox:
        collect it with `wait`. Submitting the same request again is safe."""
        partition = self.partition_of(request)
        body = encode_request(request)
        op_id = request["op_id"]
        if self._closed:
            raise Closed("client closed")
        # Registered before the publish, so an early decision is kept.
        self._pending.setdefault(op_id, _Slot())
        return await self._publish(op_id, partition, body, self._reply_subject(op_id), timeout)

    async def submit_optimistic(
        self, request: Request, topic: str, timeout: float = DEFAULT_TIMEOUT
    ) -> Submitted:
        """Submits `request` with `topic` as its apology topic and no reply
        subject: a refusal comes only as an apology (`apologies`). Resubmit
        with the same request and topic."""
        named = request.get("apology_topic")
        if named is not None and named != topic:
            raise TopicMismatch(f"op {request.get('op_id')}: names topic {named!r}, not {topic!r}")
        optimistic = dict(request)
        optimistic["apology_topic"] = topic
        body = encode_request(optimistic)
        return await self._publish(
            optimistic["op_id"], self.partition_of(optimistic), body, None, timeout
        )

    async def _publish(
        self, op_id: str, partition: int, body: bytes, reply_to: Optional[str], timeout: float
    ) -> Submitted:
        subject = f"{self.prefix}.req.{partition}"
        headers = {MSG_ID_HEADER: op_id}
        if reply_to is not None:
            headers[REPLY_TO_HEADER] = reply_to
        try:
            ack = await self.js.publish(subject, body, timeout=timeout, headers=headers)
        except Exception as e:
            raise PublishError(op_id, subject, e) from e
        return Submitted(op_id, partition, int(ack.seq), bool(ack.duplicate))

    async def wait(self, op_id: str, timeout: float) -> Decision:
        """Waits up to `timeout` seconds for the decision of an operation this
        client submitted. A decision is handed out once; `NoDecision` leaves
        the operation registered for a later wait or resubmission."""
        slot = self._pending.get(op_id)
        if slot is None:
            raise NotSubmitted(op_id)
        if slot.decision is not None:
            del self._pending[op_id]
            return slot.decision
        if self._closed:
            raise Closed("client closed")
        future: "asyncio.Future[Decision]" = asyncio.get_running_loop().create_future()
        slot.waiters = [w for w in slot.waiters if not w.done()]
        slot.waiters.append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise NoDecision(op_id, 1, timeout) from None

    async def submit_and_wait(
        self, request: Request, timeout_per_try: float = DEFAULT_TIMEOUT, tries: int = 5
    ) -> Decision:
        """Submits `request` and waits up to `timeout_per_try` seconds for its
        decision, at most `tries` times in all, resubmitting the same
        operation (same op id, body, subject, `Nats-Msg-Id` and reply
        subject) on each timeout or unacknowledged publish.

        After a wait times out it first asks the status endpoint: if the
        operation was decided (its reply was lost, and a resubmission inside
        JetStream's duplicate window would reach nobody), that decision is
        returned. A rejected decision is an answer, returned, never retried.
        Raises `NoDecision` (or the last `PublishError`) when every try
        failed.
        """
        tries = max(tries, 1)
        op_id = request.get("op_id")
        partition = self.partition_of(request)
        last_publish_error: Optional[PublishError] = None
        for _attempt in range(tries):
            try:
                await self.submit(request, timeout=timeout_per_try)
                last_publish_error = None
            except PublishError as e:
                # It may still have reached the log: wait either way (this
                # is also the backoff between tries).
                last_publish_error = e
            try:
                return await self.wait(str(op_id), timeout_per_try)
            except NoDecision:
                pass
            try:
                decision = await self.status(str(op_id), partition, timeout=timeout_per_try)
            except StatusError:
                decision = None
            if decision is not None and decision.is_final:
                self._forget(str(op_id))
                return decision
            # Unknown, or a saga in flight: resubmit (it names our reply
            # subject for the final decision).
        if last_publish_error is not None:
            raise last_publish_error
        raise NoDecision(str(op_id), tries, timeout_per_try)

    def _forget(self, op_id: str) -> None:
        slot = self._pending.get(op_id)
        if slot is not None and all(w.done() for w in slot.waiters):
            del self._pending[op_id]

    async def _on_reply(self, msg: Any) -> None:
        try:
            decision = Decision.from_json(json.loads(msg.data))
        except ValueError:
            return  # not a decision: dropped
        if not decision.is_final:
            return  # a saga in flight: its final decision follows
        slot = self._pending.get(decision.op_id)
        if slot is None or slot.decision is not None:
            return  # handed out already, or not ours
        delivered = False
        for w in slot.waiters:
            if not w.done():
                w.set_result(decision)
                delivered = True
        slot.waiters = []
        if delivered:
            del self._pending[decision.op_id]
        else:
            slot.decision = decision

    # --- queries -----------------------------------------------------------

    async def status(
        self, op_id: str, partition: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Optional[Decision]:
        """What the status endpoint of `partition` knows of `op_id`: its
        decision, or None if the partition has no record of it (not yet
        applied, refused to its sender only, or forgotten). Without
        `partition`, every partition is asked until one knows it (an op id
        alone does not say where a request was routed)."""
        if partition is None:
            for p in range(self.partitions):
                found = await self.status(op_id, p, timeout)
                if found is not None:
                    return found
            return None
        subject = f"{self.prefix}.status.{partition}"
        answer = await self._query(subject, op_id.encode("utf-8"), timeout, StatusError)
        status = answer.get("status")
        if status == "decided":
            try:
                return Decision.from_json(answer["decision"])
            except (KeyError, ValueError) as e:
                raise StatusError(subject, "unreadable decision", e) from None
        if status == "unknown":
            return None
        raise StatusError(subject, f"unreadable answer {answer!r}")

    async def balance(self, account: str, timeout: float = DEFAULT_TIMEOUT) -> Optional[Balance]:
        """`account`'s balance, holds and limits, or None if its partition
        has no such account (as of the position it has applied)."""
        subject = f"{self.prefix}.query.balance.{partition_of(account, self.partitions)}"
        answer = await self._query(subject, account.encode("utf-8"), timeout)
        status = answer.get("status")
        if status == "unknown":
            return None
        if status == "found":
            return _read(subject, Balance.from_json, answer)
        raise QueryError(subject, f"unreadable answer {answer!r}")

    async def claim_owner(
        self, namespace: str, key: str, timeout: float = DEFAULT_TIMEOUT
    ) -> ClaimOwner:
        """Who holds the claim `(namespace, key)`; `.owner` None if free."""
        p = partition_of(claim_routing_key(namespace, key), self.partitions)
        subject = f"{self.prefix}.query.claim.{p}"
        body = json.dumps({"namespace": namespace, "key": key}, ensure_ascii=False)
        answer = await self._query(subject, body.encode("utf-8"), timeout)
        if answer.get("status") in ("claimed", "free"):
            return _read(subject, ClaimOwner.from_json, answer)
        raise QueryError(subject, f"unreadable answer {answer!r}")

    async def partition_stats(
        self, partition: int, timeout: float = DEFAULT_TIMEOUT
    ) -> PartitionStats:
        """One partition's supervisor state, applied position and lag."""
        subject = f"{self.prefix}.stats.{partition}"
        answer = await self._query(subject, b"", timeout)
        return _read(subject, PartitionStats.from_json, answer)

    async def stats(self, timeout: float = DEFAULT_TIMEOUT) -> List[PartitionStats]:
        """The stats of every partition, in partition order."""
        return list(
            await asyncio.gather(
                *(self.partition_stats(p, timeout) for p in range(self.partitions))
            )
        )

    async def _query(
        self, subject: str, body: bytes, timeout: float, error: type = QueryError
    ) -> Dict[str, Any]:
        try:
            reply = await self.nc.request(subject, body, timeout=timeout)
        except Exception as e:
            raise error(subject, f"no reply within {timeout:g} s", e) from None
        try:
            answer = json.loads(reply.data)
        except ValueError as e:
            raise error(subject, "unreadable reply", e) from None
        if not isinstance(answer, dict):
            raise error(subject, f"unreadable reply {answer!r}")
        if answer.get("status") == "error":
            raise error(subject, str(answer.get("detail", "an error")))
        return answer

    # --- apologies ---------------------------------------------------------

    def apologies(
        self, topic: str, durable: str, ack_wait: float = 30.0, batch: int = 16
    ) -> "Apologies":
        """The apologies of `topic`, read through the durable pull consumer
        `durable` (at least once: ack each after making amends, idempotently
        by its op id). A new name starts at the topic's first apology still
        in the stream; the same name resumes after the last acknowledged
        one. Iterate with `async for`."""
        from .apologies import Apologies

        return Apologies(self, topic, durable, ack_wait, batch)


def _read(subject: str, read: Any, answer: Dict[str, Any]) -> Any:
    try:
        return read(answer)
    except (KeyError, TypeError, ValueError) as e:
        raise QueryError(subject, f"unreadable answer {answer!r}", e) from None


async def connect(
    servers: Union[str, Sequence[str]] = "nats://127.0.0.1:4222",
    prefix: str = "amends",
    partitions: Optional[int] = None,
    *,
    name: str = "amends-python",
    user: Optional[str] = None,
    password: Optional[str] = None,
    token: Optional[str] = None,
    creds: Optional[str] = None,
    nkey_seed: Optional[str] = None,
    tls: Optional[ssl.SSLContext] = None,
    tls_ca_file: Optional[str] = None,
    tls_cert_file: Optional[str] = None,
    tls_key_file: Optional[str] = None,
    connect_timeout: float = 2.0,
    **nats_options: Any,
) -> Client:
    """Connects to NATS, learns the partition count (`partitions`, or the
    `partitions` key of the deployment's `<PREFIX>_META` bucket) and
    subscribes to the client's inbox.

    `creds` (a .creds file) and `nkey_seed` (a seed file) need the `nkeys`
    package (`pip install nats-py[nkeys]`). TLS: pass an `ssl.SSLContext`,
    or `tls_ca_file` (and `tls_cert_file` + `tls_key_file` for a client
    certificate). Other keyword arguments go to `nats.connect` as they are.
    """
    import nats

    check_prefix(prefix)
    if partitions is not None and not 1 <= partitions <= PARTITIONS_MAX:
        raise ConnectError(f"partitions = {partitions}: must be 1 to {PARTITIONS_MAX}")
    urls = [servers] if isinstance(servers, str) else list(servers)
    urls = [u.strip() for url in urls for u in url.split(",") if u.strip()]
    if not urls:
        raise ConnectError("no NATS server URL given")
    if tls is None and (tls_ca_file or tls_cert_file):
        tls = ssl.create_default_context(cafile=tls_ca_file)
        if tls_cert_file:
            tls.load_cert_chain(tls_cert_file, tls_key_file)
    options: Dict[str, Any] = dict(nats_options)
    for key, value in (
        ("user", user),
        ("password", password),
        ("token", token),
        ("user_credentials", creds),
        ("nkeys_seed", nkey_seed),
        ("tls", tls),
    ):
        if value is not None:
            options[key] = value
    try:
        nc = await nats.connect(
            urls,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=options.pop("max_reconnect_attempts", -1),
            **options,
        )
    except Exception as e:
        raise ConnectError(f"cannot connect to {', '.join(urls)}: {e!r}") from e
    try:
        if partitions is None:
            partitions = await read_partitions(nc.jetstream(), prefix)
        client = Client(nc, prefix, partitions)
        await client._start()
    except BaseException:
        await nc.close()
        raise
    return client


async def read_partitions(js: Any, prefix: str) -> int:
    """The partition count recorded under `partitions` in `<PREFIX>_META`."""
    bucket = stream_name(prefix, "META")
    try:
        kv = await js.key_value(bucket)
        entry = await kv.get(PARTITIONS_KEY)
    except Exception as e:
        raise MetaError(f"{bucket}: cannot read {PARTITIONS_KEY!r} (is amends serving?): {e!r}") from e
    # Exactly the decimal digits amends writes (protocol: "Subjects"): no
    # whitespace, sign or leading zero, as amends itself reads it.
    text = (entry.value or b"").decode("ascii", "replace")
    canonical = text.isascii() and text.isdigit() and not text.startswith("0")
    n = int(text) if canonical else 0
    if not 1 <= n <= PARTITIONS_MAX:
        raise MetaError(f"{bucket}: {PARTITIONS_KEY} = {text!r} is not a partition count")
    return n
