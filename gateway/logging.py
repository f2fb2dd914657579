"""structlog set-up: one JSON object per line on stdout."""

from __future__ import annotations

import logging
import sys

import msgspec
import structlog

# msgspec renders a request's log line in about half the time of the
# standard library's json; anything it cannot encode is logged as its repr.
_encoder = msgspec.json.Encoder(enc_hook=repr)


def _render(obj: object, **_: object) -> bytes:
    return _encoder.encode(obj)


def _render_text(obj: object, **_: object) -> str:
    return _encoder.encode(obj).decode()


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
                structlog.processors.TimeStamper(fmt="iso", utc=True),
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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_render),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
