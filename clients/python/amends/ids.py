"""Operation ids (specs/protocol.md, "Operation ids"): UUID v7, made by the
client once per operation and kept for every resubmission."""

from __future__ import annotations

import os
import time
from typing import Optional


def new_op_id(ms: Optional[int] = None) -> str:
    """A UUID v7 in canonical text: 48-bit ms timestamp (now, unless `ms`
    is given), random rest. The clock must be within 15 minutes (by default)
    of the deployment's, or amends refuses it as `op_id_outside_window`."""
    if ms is None:
        ms = time.time_ns() // 1_000_000
    b = bytearray(os.urandom(16))
    b[0:6] = (ms & ((1 << 48) - 1)).to_bytes(6, "big")
    b[6] = 0x70 | (b[6] & 0x0F)
    b[8] = 0x80 | (b[8] & 0x3F)
    h = b.hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
