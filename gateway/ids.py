"""Fresh random identifiers: request ids and usage-record ids.

`uuid.uuid4()` asks the kernel for 16 random bytes on every call and builds
a `UUID` object to format them: on the request path, twice per request, a
system call each time. `new_id` draws the same kernel randomness 256 ids at
a time and formats the bytes directly. A child process starts with an empty
buffer (`os.register_at_fork`), so a fork never repeats its parent's ids.
"""

from __future__ import annotations

import os
import threading

_BATCH = 16 * 256


class _Pool:
    __slots__ = ("buffer", "lock", "offset")

    def __init__(self) -> None:
        self.buffer = b""
        self.offset = 0
        self.lock = threading.Lock()

    def reset(self) -> None:
        # A fresh lock too: another thread may have held the parent's.
        self.buffer, self.offset, self.lock = b"", 0, threading.Lock()


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.reset)


def new_id() -> str:
    """A random version-4 UUID as 32 lower-case hex digits (``uuid4().hex``)."""
    pool = _pool
    with pool.lock:
        start = pool.offset
        if start + 16 > len(pool.buffer):
            pool.buffer, start = os.urandom(_BATCH), 0
        pool.offset = start + 16
        raw = bytearray(pool.buffer[start : start + 16])
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()
