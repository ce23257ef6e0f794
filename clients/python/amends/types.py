"""What the deployment answers: decisions, statuses, query answers and
apologies. Each keeps the JSON object it was read from in `raw`, because
readers must ignore fields they do not know and new ones may be added."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

Json = Dict[str, Any]


@dataclass(frozen=True)
class Decision:
    """The answer to one operation (protocol: "The decision")."""

    op_id: str
    partition: int
    position: int
    log_time_ms: int
    outcome: str
    """`confirmed` or `rejected` (`in_flight` only for a saga in flight, in
    a status answer)."""
    reason: Optional[Json] = None
    """When rejected: `{"code": ..., ...data}`."""
    balance: Optional[int] = None
    available: Optional[int] = None
    transfer: Optional[Json] = None
    """For a transfer: what it moves, `{"from": ..., "to": ..., "amount": ...}`."""
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @property
    def confirmed(self) -> bool:
        return self.outcome == "confirmed"

    @property
    def rejected(self) -> bool:
        return self.outcome == "rejected"

    @property
    def is_final(self) -> bool:
        """Confirmed or rejected (not a saga in flight)."""
        return self.outcome in ("confirmed", "rejected")

    @property
    def reason_code(self) -> Optional[str]:
        """The reason's code when rejected (treat an unknown one as a
        refusal: new codes may be added)."""
        return None if self.reason is None else self.reason.get("code")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Decision":
        """Reads a decision; `ValueError` if `obj` is not one."""
        try:
            return cls(
                op_id=str(obj["op_id"]),
                partition=int(obj["partition"]),
                position=int(obj["position"]),
                log_time_ms=int(obj["log_time_ms"]),
                outcome=str(obj["outcome"]),
                reason=obj.get("reason"),
                balance=obj.get("balance"),
                available=obj.get("available"),
                transfer=obj.get("transfer"),
                raw=dict(obj),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a decision: {e!r}") from None


@dataclass(frozen=True)
class Submitted:
    """What JetStream acknowledged: the request is durably in its
    partition's log."""

    op_id: str
    partition: int
    sequence: int
    """Its position in the requests stream (the original's, for a duplicate)."""
    duplicate: bool
    """JetStream dropped this publish as a copy of one inside the duplicate
    window. Not an error: the log already holds the operation."""


@dataclass(frozen=True)
class Balance:
    """An account as its partition has it (`<prefix>.query.balance.<p>`)."""

    account: str
    balance: int
    held: int
    incoming: int
    available: int
    floor: int
    ceiling: Optional[int]
    position: int
    log_time_ms: int
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Balance":
        return cls(
            account=obj["account"],
            balance=obj["balance"],
            held=obj["held"],
            incoming=obj["incoming"],
            available=obj["available"],
            floor=obj["floor"],
            ceiling=obj.get("ceiling"),
            position=obj["position"],
            log_time_ms=obj["log_time_ms"],
            raw=dict(obj),
        )


@dataclass(frozen=True)
class ClaimOwner:
    """Who holds a claim (`<prefix>.query.claim.<p>`); `owner` is None when
    it is free."""

    namespace: str
    key: str
    owner: Optional[str]
    tentative: bool
    """Held by a saga in flight."""
    position: int
    log_time_ms: int
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @property
    def claimed(self) -> bool:
        return self.owner is not None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ClaimOwner":
        claimed = obj["status"] == "claimed"
        return cls(
            namespace=obj["namespace"],
            key=obj["key"],
            owner=obj["owner"] if claimed else None,
            tentative=bool(obj.get("tentative", False)) if claimed else False,
            position=obj["position"],
            log_time_ms=obj["log_time_ms"],
            raw=dict(obj),
        )


@dataclass(frozen=True)
class PartitionStats:
    """A partition's state and position (`<prefix>.stats.<p>`)."""

    partition: int
    state: str
    """`running`, `restarting` or `stopped` (then `detail` says why)."""
    detail: Optional[str]
    restarts: int
    applied_position: int
    log_time_ms: int
    last_sequence: Optional[int]
    lag: Optional[int]
    """`last_sequence - applied_position`; None if the stream could not be read."""
    owner: Optional[Json] = None
    """The latest ownership record: `{"epoch": ..., "host": ..., "pid": ...}`,
    None if the partition has none (or it could not be read)."""
    raw: Json = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "PartitionStats":
        return cls(
            partition=obj["partition"],
            state=obj["state"],
            detail=obj.get("detail"),
            restarts=obj["restarts"],
            applied_position=obj["applied_position"],
            log_time_ms=obj["log_time_ms"],
            last_sequence=obj.get("last_sequence"),
            lag=obj.get("lag"),
            owner=obj.get("owner"),
            raw=dict(obj),
        )
