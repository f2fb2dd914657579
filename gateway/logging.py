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


def configure_logging(level: str = "info") -> None:
    """Route structlog and stdlib logging to JSON lines at `level`."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, stream=sys.stdout, format="%(message)s")
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
