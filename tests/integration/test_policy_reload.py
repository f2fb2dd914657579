"""Hot reload against real files: valid edits apply, invalid ones are held back."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.policy.errors import PolicyError
from gateway.policy.watcher import PolicyWatcher

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(policy_dirs: tuple[Path, Path]) -> Path:
    """The folder holding the conftest's private tenants/ and policies/ copies."""
    return policy_dirs[0].parent


@pytest.fixture
async def watcher(tree: Path) -> AsyncIterator[PolicyWatcher]:
    w = PolicyWatcher(tree / "tenants", tree / "policies", poll_interval_s=0.1, environ={})
    await w.start()
    try:
        yield w
    finally:
        await w.stop()


async def wait_for(condition: Callable[[], bool], timeout_s: float = 2.0) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def display_name(w: PolicyWatcher, tenant: str) -> str:
    found = w.current.tenant(tenant)
    assert found is not None
    return found.display_name


def set_display_name(tree: Path, tenant: str, name: str) -> None:
    path = tree / "tenants" / f"{tenant}.yaml"
    lines = path.read_text().splitlines()
    lines = [f"display_name: {name}" if ln.startswith("display_name:") else ln for ln in lines]
    path.write_text("\n".join(lines) + "\n")


async def test_valid_edit_is_in_force_within_two_seconds(
    watcher: PolicyWatcher, tree: Path
) -> None:
    before = watcher.current
    captured = watcher.current  # what an in-flight request holds
    set_display_name(tree, "acme", "ACME Renamed")
    await wait_for(lambda: watcher.current.version != before.version)
    assert display_name(watcher, "acme") == "ACME Renamed"
    assert watcher.reloads_ok == 1 and watcher.reloads_failed == 0
    # The captured policy is untouched by the swap.
    assert captured is before
    old_acme = captured.tenant("acme")
    assert old_acme is not None and old_acme.display_name == "ACME Corporation"


async def test_invalid_edit_is_rejected_and_old_policy_kept(
    watcher: PolicyWatcher, tree: Path
) -> None:
    before = watcher.current
    path = tree / "tenants" / "globex.yaml"
    good = path.read_text()
    path.write_text(good.replace("tier: free", "tier: platinum"))
    await wait_for(lambda: watcher.reloads_failed >= 1)
    error = watcher.last_error
    assert error is not None and watcher.last_error_at is not None
    assert [Path(f).name for f in error.files()] == ["globex.yaml"]
    assert "tier" in error.format()
    assert watcher.current is before

    # Requests keep being served from the old policy while the files are bad.
    await asyncio.sleep(0.3)
    assert watcher.current is before

    path.write_text(good.replace("display_name: Globex", "display_name: Globex Fixed"))
    await wait_for(lambda: watcher.last_error is None)
    assert display_name(watcher, "globex") == "Globex Fixed"
    assert watcher.reloads_ok >= 1


async def test_removed_and_added_tenant_files_reload(watcher: PolicyWatcher, tree: Path) -> None:
    (tree / "tenants" / "initech.yaml").unlink()
    await wait_for(lambda: watcher.current.tenant("initech") is None)
    text = (tree / "tenants" / "globex.yaml").read_text().replace("id: globex", "id: hooli")
    (tree / "tenants" / "hooli.yaml").write_text(text)
    await wait_for(lambda: watcher.current.tenant("hooli") is not None)


async def test_policy_file_edit_reloads(watcher: PolicyWatcher, tree: Path) -> None:
    path = tree / "policies" / "priorities.yaml"
    path.write_text(path.read_text().replace("max_queue_wait_s: 600", "max_queue_wait_s: 900"))
    await wait_for(lambda: watcher.current.priority_classes["batch"].max_queue_wait_s == 900)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_sighup_triggers_reload(tree: Path) -> None:
    # Polling is effectively off, so only the signal can explain a reload.
    w = PolicyWatcher(tree / "tenants", tree / "policies", poll_interval_s=3600, environ={})
    await w.start()
    try:
        before = w.current
        set_display_name(tree, "acme", "Reloaded By Signal")
        await asyncio.sleep(0.3)
        assert w.current is before
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: w.current is not before)
        assert display_name(w, "acme") == "Reloaded By Signal"
    finally:
        await w.stop()


async def test_reload_without_changes_keeps_the_same_policy(watcher: PolicyWatcher) -> None:
    before = watcher.current
    assert await watcher.reload() is True
    assert watcher.current is before


async def test_initial_load_must_succeed(tree: Path) -> None:
    (tree / "tenants" / "acme.yaml").write_text("id: acme\n")
    w = PolicyWatcher(tree / "tenants", tree / "policies", environ={})
    with pytest.raises(PolicyError) as info:
        await w.start()
    assert "acme.yaml" in info.value.format()
    with pytest.raises(RuntimeError):
        _ = w.current


async def test_loading_happens_off_the_event_loop(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import gateway.policy.watcher as watcher_module
    from gateway.policy import loader

    threads: list[int] = []
    real = loader.load_policy

    def spy(*args, **kwargs):
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(watcher_module, "load_policy", spy)
    w = PolicyWatcher(tree / "tenants", tree / "policies", environ={})
    await w.start()
    await w.stop()
    assert threads and threading.get_ident() not in threads
