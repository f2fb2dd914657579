"""structlog set-up: one JSON object per line on stdout.

Lines are written by `LineWriter`, which flushes each line at once except
inside `LineWriter.batch()`, where the lines logged in the block leave in
one write when it ends (`gateway.observe.request_log` writes the per-request
lines that way, off the requests' path).
"""

from __future__ import annotations

import datetime
import logging
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, BinaryIO

import msgspec
import structlog

# msgspec renders a request's log line in about half the time of the
# standard library's json; anything it cannot encode is logged as its repr.
_encoder = msgspec.json.Encoder(enc_hook=repr)


def _render(obj: object, **_: object) -> bytes:
    return _encoder.encode(obj)


def _render_text(obj: object, **_: object) -> str:
    return _encoder.encode(obj).decode()


def iso_timestamp(seconds: float) -> str:
    """`seconds` since the epoch as the log lines' UTC ISO 8601 timestamp."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat().replace("+00:00", "Z")


EVENT_TIME = "_event_time"
"""Key under which a line logged later than its event happened (a request's,
written in a batch) passes the event's time, in seconds since the epoch; it
becomes the line's ``timestamp``."""


def _stamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    happened = event.pop(EVENT_TIME, None)
    event["timestamp"] = iso_timestamp(time.time() if happened is None else happened)
    return event


class LineWriter:
    """structlog's logger: writes each rendered line to ``out``; flushed at
    once, or, inside ``batch()``, together when the block ends."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.Lock()  # library threads log too
        self._batching = False

    def msg(self, message: bytes) -> None:
        """Write one rendered line."""
        with self._lock:
            self._out.write(message + b"\n")
            if not self._batching:
                self._out.flush()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg

    def retarget(self, out: BinaryIO) -> None:
        """Write to ``out`` from now on."""
        with self._lock:
            self._out = out

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the flush of the lines logged in the block until it ends."""
        with self._lock:
            self._batching = True
        try:
            yield
        finally:
            with self._lock:
                self._batching = False
                self._out.flush()


_writer: LineWriter | None = None


def line_writer() -> LineWriter:
    """The process's `LineWriter` (on stdout until `configure_logging` runs)."""
    global _writer
    if _writer is None:
        _writer = LineWriter(sys.stdout.buffer)
    return _writer


_QUIET_BELOW_WARNING = ("httpx", "httpcore")
"""Libraries that log every request at INFO: the gateway's own probes and load
reads would otherwise print a line each, several times a second."""


def configure_logging(level: str = "info") -> None:
    """Route structlog and stdlib logging to JSON lines at `level`."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    # Records from libraries (stdlib logging) get the same JSON shape as ours.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                _stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=_render_text),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    # Loggers cached before this call hold the same writer: point it at
    # today's stdout rather than making another.
    writer = line_writer()
    writer.retarget(sys.stdout.buffer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _stamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_render),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
