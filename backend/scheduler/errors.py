"""Errors the scheduler raises to its caller."""

from __future__ import annotations


class QueueFullError(Exception):
    """The waiting queue already holds `max_waiting` requests; the caller should
    refuse the request (HTTP 429) rather than queue it.
    """

    def __init__(self, max_waiting: int) -> None:
        super().__init__(f"waiting queue is full ({max_waiting} requests)")
        self.max_waiting = max_waiting
