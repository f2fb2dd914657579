"""Active probing and load polling of every replica, in the app's lifespan.

One task per replica loops over three timers from its pool's ``health``
settings: the load reading (``load_interval_s``, through
``gateway.upstream.load.read_load``), the probes (``probe_interval_s``:
liveness, then readiness) and, when configured, the deep probe
(``deep_probe_interval_s``: one generated token). Probe results and load
reads that cannot connect feed the replica's health (``ReplicaState``);
the loop itself never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import structlog

from gateway.policy.compiled import Policy
from gateway.upstream.health import (
    ProbeResult,
    ReplicaBook,
    ReplicaState,
    report_failure,
    report_success,
)
from gateway.upstream.load import LoadFormatError, read_load

log = structlog.get_logger("tollgate.health")

_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


class ReplicaMonitor:
    """Probes and load polls for every replica in a ``ReplicaBook``."""

    def __init__(self, book: ReplicaBook, client: httpx.AsyncClient) -> None:
        self._book = book
        self._client = client
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self) -> None:
        """Start a loop for every replica the book tracks (on the event loop)."""
        self._sync()

    def configure(self, policy: Policy) -> None:
        """Apply a reloaded policy: the book first, then one loop per replica."""
        self._book.configure(policy)
        self._sync()

    async def stop(self) -> None:
        """Stop every loop."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _sync(self) -> None:
        wanted = {state.url: state for state in self._book.states()}
        for url in list(self._tasks):
            if url not in wanted:
                self._tasks.pop(url).cancel()
        for url, state in wanted.items():
            if url not in self._tasks:
                self._tasks[url] = asyncio.create_task(self._run(state), name=f"monitor {url}")

    async def _run(self, state: ReplicaState) -> None:
        next_load = next_probe = 0.0
        next_deep: float | None = None
        while True:
            try:
                now = time.monotonic()
                config = state.config
                if now >= next_load:
                    await self._read_load(state)
                    next_load = time.monotonic() + config.load_interval_s
                if now >= next_probe:
                    if config.liveness_path or config.readiness_path:
                        await self._probe(state)
                    next_probe = time.monotonic() + config.probe_interval_s
                deep = config.deep_probe_interval_s
                if deep is None:
                    next_deep = None
                elif next_deep is None:
                    next_deep = now + deep  # the first one after a full interval
                elif now >= next_deep:
                    await self._deep_probe(state)
                    next_deep = time.monotonic() + deep
                wake = min(next_load, next_probe, next_deep if next_deep is not None else next_load)
                await asyncio.sleep(max(0.0, wake - time.monotonic()))
            except asyncio.CancelledError:
                raise
            except Exception:
                # The monitor must outlive any surprise; try again shortly.
                log.exception("replica_monitor_failed", replica=state.url)
                await asyncio.sleep(1.0)

    async def _read_load(self, state: ReplicaState) -> None:
        started = time.monotonic()
        try:
            timeout = state.config.probe_timeout_s
            load = await read_load(self._client, state.kind, state.url, timeout)
        except _CONNECT_ERRORS as exc:
            state.load_error = type(exc).__name__
            # Nothing listens: as telling as a failed probe, and sooner.
            self._failed(state, f"load read: {type(exc).__name__}", probe_result=False)
        except (httpx.HTTPError, LoadFormatError) as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"[:200]
        else:
            state.record_load(load, started)

    async def _probe(self, state: ReplicaState) -> None:
        config = state.config
        for path in (config.liveness_path, config.readiness_path):
            if path is None:
                continue
            detail = await self._get(state.url.rstrip("/") + path, config.probe_timeout_s)
            if detail is not None:
                self._failed(state, f"GET {path}: {detail}")
                return
        self._passed(state, "ok")

    async def _deep_probe(self, state: ReplicaState) -> None:
        if state.deep_probe_model is None:
            return
        body = {"model": state.deep_probe_model, "prompt": "ping", "max_tokens": 1}
        timeout = max(state.config.probe_timeout_s, 10.0)
        try:
            response = await self._client.post(
                state.url.rstrip("/") + "/v1/completions", json=body, timeout=timeout
            )
        except httpx.HTTPError as exc:
            self._failed(state, f"POST /v1/completions: {type(exc).__name__}")
            return
        if response.status_code == 200:
            self._passed(state, "deep ok")
        else:
            self._failed(state, f"POST /v1/completions: status {response.status_code}")

    async def _get(self, url: str, timeout_s: float) -> str | None:
        """None when ``url`` answers 200, else what went wrong."""
        try:
            response = await self._client.get(url, timeout=timeout_s)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None if response.status_code == 200 else f"status {response.status_code}"

    def _passed(self, state: ReplicaState, detail: str) -> None:
        state.last_probe = ProbeResult(time.monotonic(), True, detail)
        report_success(state, probe=True)

    def _failed(self, state: ReplicaState, reason: str, *, probe_result: bool = True) -> None:
        # Every failure here is an active check's (a load read that cannot
        # connect counts too, but is not a probe result to show).
        if probe_result:
            state.last_probe = ProbeResult(time.monotonic(), False, reason)
        report_failure(state, reason, probe=True)
