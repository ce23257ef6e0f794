"""The exceptions of the amends client: one base class, one class per cause.

A rejected decision is not an exception: it is an answer
(`Decision.rejected`). These are raised when the client could not get an
answer at all, or was used wrongly.
"""

from __future__ import annotations

from typing import Optional


class AmendsError(Exception):
    """The base of every error this package raises."""


class ConnectError(AmendsError):
    """NATS could not be reached, or the connection options are invalid."""


class MetaError(AmendsError):
    """The partition count could not be read from the `<PREFIX>_META` bucket
    (no deployment under that prefix yet, or an unreadable value)."""


class InvalidRequest(AmendsError):
    """The request cannot be sent as it is: no routing key (a tick, or an
    unknown command type), a missing op id, or a body over the size limit."""


class PublishError(AmendsError):
    """JetStream did not acknowledge the publish of an operation. It may still
    have reached the log: resubmit the same request (same op id)."""

    def __init__(self, op_id: str, subject: str, cause: BaseException) -> None:
        super().__init__(f"op {op_id}: publish to {subject} not acknowledged: {cause!r}")
        self.op_id = op_id
        self.subject = subject
        self.cause = cause


class NoDecision(AmendsError):
    """No decision arrived in time. The operation stays registered: a later
    `wait` or a resubmission (same op id) can still collect its decision."""

    def __init__(self, op_id: str, tries: int, per_try: float) -> None:
        super().__init__(f"op {op_id}: no decision after {tries} tries of {per_try:g} s")
        self.op_id = op_id
        self.tries = tries
        self.per_try = per_try


class NotSubmitted(AmendsError):
    """`wait` was asked for an op id this client did not submit (or whose
    decision was already handed out)."""

    def __init__(self, op_id: str) -> None:
        super().__init__(f"op {op_id}: not submitted through this client, or already collected")
        self.op_id = op_id


class Closed(AmendsError):
    """The client was closed: no decision can arrive any more."""


class QueryError(AmendsError):
    """A request-reply endpoint (status, balance, claim, stats) did not answer
    in time, refused the request, or answered something unreadable."""

    def __init__(self, subject: str, detail: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(f"{subject}: {detail}" + (f" ({cause!r})" if cause else ""))
        self.subject = subject
        self.detail = detail
        self.cause = cause


class StatusError(QueryError):
    """The status endpoint did not answer an op id's status."""


class ApologyError(AmendsError):
    """The apology consumer could not be set up or read, or a message on the
    topic was not a readable apology (it is then terminated: never delivered
    again)."""


class TopicMismatch(InvalidRequest):
    """`submit_optimistic` got a request naming another apology topic."""
