"""Keep the policy in force current: poll the files, reload on change or SIGHUP.

A reload that fails leaves the running policy untouched and is recorded in
``last_error``; the next change is tried again. Loading runs in a worker
thread, so the event loop never waits on the disk, and the swap is a single
reference assignment, so a request that captured ``current`` keeps using the
policy it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

import structlog

from gateway.policy.compiled import Policy
from gateway.policy.errors import PolicyError
from gateway.policy.loader import YAML_SUFFIXES, load_policy

log = structlog.get_logger(__name__)

Fingerprint = tuple[tuple[str, int, int, int], ...]


def _fingerprint(directories: tuple[Path, ...]) -> Fingerprint:
    # Name, inode, size and mtime: editors that save by rename change the inode
    # even when size and mtime happen to match.
    entries: list[tuple[str, int, int, int]] = []
    for directory in directories:
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if not entry.name.endswith(YAML_SUFFIXES) or entry.name.startswith("."):
                        continue
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    entries.append((entry.path, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            entries.append((str(directory), -1, -1, -1))
    return tuple(sorted(entries))


class PolicyWatcher:
    """Owns the policy in force for one gateway process.

    ``start()`` loads the policy (raising PolicyError if it is invalid) and
    begins watching; ``stop()`` ends it. Read ``current`` once per request.
    """

    def __init__(
        self,
        tenants_dir: Path,
        policies_dir: Path,
        *,
        poll_interval_s: float = 0.5,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        self.tenants_dir = tenants_dir
        self.policies_dir = policies_dir
        self.poll_interval_s = poll_interval_s
        self._environ = environ
        self._current: Policy | None = None
        self._fingerprint: Fingerprint = ()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._sighup_loop: asyncio.AbstractEventLoop | None = None
        self._sighup_previous: signal.Handlers | Callable[..., object] | int | None = None
        self.last_error: PolicyError | None = None
        """The latest failed reload, cleared by the next successful one."""
        self.last_error_at: datetime | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_at: float | None = None
        """Unix time the last load or reload finished, whatever its outcome."""
        self.on_change: list[Callable[[Policy], None]] = []
        """Called (on the event loop) with each newly swapped-in policy."""

    @property
    def current(self) -> Policy:
        """The policy in force; raises RuntimeError before ``start()``."""
        if self._current is None:
            raise RuntimeError("PolicyWatcher.start() has not loaded a policy yet")
        return self._current

    async def start(self) -> None:
        """Load the policy (PolicyError if invalid), then watch for changes."""
        if self._task is not None:
            return
        self._fingerprint = await asyncio.to_thread(self._stat)
        self._current = await asyncio.to_thread(self._load)
        self.last_reload_at = time.time()
        log.info("policy_loaded", version=self._current.version)
        self._install_sighup()
        self._task = asyncio.create_task(self._run(), name="policy-watcher")

    async def stop(self) -> None:
        """Stop watching; ``current`` stays readable."""
        self._remove_sighup()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def request_reload(self) -> None:
        """Ask the watcher to reload now, whether or not files changed (SIGHUP does this)."""
        self._wake.set()

    async def reload(self) -> bool:
        """Reload now; True when the files loaded (changed or not), False when rejected."""
        async with self._reload_lock:
            fingerprint = await asyncio.to_thread(self._stat)
            self._fingerprint = fingerprint
            try:
                policy = await asyncio.to_thread(self._load)
            except PolicyError as exc:
                self.reloads_failed += 1
                self.last_reload_at = time.time()
                self.last_error = exc
                self.last_error_at = exc.at
                log.error(
                    "policy_reload_rejected",
                    issues=[i.format() for i in exc.issues],
                    kept_version=self._current.version if self._current else None,
                )
                return False
            self.reloads_ok += 1
            self.last_reload_at = time.time()
            self.last_error = None
            self.last_error_at = None
            previous = self._current
            if previous is None or policy.version != previous.version:
                self._current = policy
                log.info(
                    "policy_reloaded",
                    version=policy.version,
                    previous=previous.version if previous else None,
                )
                for callback in self.on_change:
                    callback(policy)
            return True

    def _load(self) -> Policy:
        return load_policy(self.tenants_dir, self.policies_dir, environ=self._environ)

    def _stat(self) -> Fingerprint:
        return _fingerprint((self.tenants_dir, self.policies_dir))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)
            forced = self._wake.is_set()
            self._wake.clear()
            try:
                if forced or await asyncio.to_thread(self._stat) != self._fingerprint:
                    await self.reload()
            except Exception:
                # The watcher must outlive any surprise; the next tick tries again.
                log.exception("policy_watch_failed")

    def _install_sighup(self) -> None:
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None or threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(sighup)
        try:
            loop.add_signal_handler(sighup, self.request_reload)
        except (NotImplementedError, RuntimeError, ValueError):
            return
        self._sighup_loop = loop
        self._sighup_previous = previous

    def _remove_sighup(self) -> None:
        loop, self._sighup_loop = self._sighup_loop, None
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
            # remove_signal_handler resets to SIG_DFL, which for SIGHUP would
            # terminate the process; put back whatever was there before us.
            if self._sighup_previous is not None:
                signal.signal(signal.SIGHUP, self._sighup_previous)
