"""A policy ConfigMap edited with `kubectl apply` reaches a running gateway.

The kubelet writes a ConfigMap volume the way its AtomicWriter does: the files
live in a hidden timestamped folder, `..data` is a symlink to it, and each
file name is a symlink through `..data`. An update writes a new timestamped
folder, points a temporary symlink at it and renames that over `..data` (one
atomic step), adds links for new keys, removes links of deleted keys and then
the old folder. The gateway's policy watcher must see that swap."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from gateway.policy.compiled import Policy
from gateway.policy.watcher import PolicyWatcher
from tests.deploy.support import REPO

DATA = "..data"


class ConfigMapVolume:
    """A folder laid out and updated like a kubelet ConfigMap volume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True)
        self._count = 0

    def publish(self, files: Mapping[str, str]) -> None:
        self._count += 1
        stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M_%S")
        version = self.root / f"..{stamp}.{self._count:09d}"
        version.mkdir()
        for name, text in files.items():
            (version / name).write_text(text, encoding="utf-8")
        previous = os.readlink(self.root / DATA) if (self.root / DATA).is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(version.name, tmp)
        os.rename(tmp, self.root / DATA)  # the atomic swap
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"{DATA}/{name}", link)
        for link in self.root.iterdir():
            if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
                link.unlink()
        if previous is not None:
            old = self.root / previous
            for file in old.iterdir():
                file.unlink()
            old.rmdir()


def shipped(kind: str) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((REPO / kind).glob("*.yaml"))}


def edited_tenant(name: str, **changes: object) -> str:
    data = yaml.safe_load((REPO / "tenants" / name).read_text(encoding="utf-8"))
    data.update(changes)
    return yaml.safe_dump(data, sort_keys=False)


async def eventually(check: Callable[[], bool], within_s: float = 2.0) -> bool:
    """Whether ``check()`` holds within ``within_s`` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + within_s
    for _ in range(int(within_s / 0.02) + 1):
        if check():
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    return check()


async def wait_for(watcher: PolicyWatcher, predicate: Callable[[Policy], bool]) -> None:
    """Fail unless ``predicate(watcher.current)`` holds within 2 s."""
    if not await eventually(lambda: predicate(watcher.current)):
        pytest.fail(f"the new policy was not in force after 2 s (last error: {watcher.last_error})")


@pytest.fixture
def volumes(tmp_path: Path) -> tuple[ConfigMapVolume, ConfigMapVolume]:
    tenants = ConfigMapVolume(tmp_path / "tenants")
    policies = ConfigMapVolume(tmp_path / "policies")
    tenants.publish(shipped("tenants"))
    policies.publish(shipped("policies"))
    return tenants, policies


def test_volume_layout_is_the_kubelets(volumes: tuple[ConfigMapVolume, ConfigMapVolume]) -> None:
    tenants, _ = volumes
    link = tenants.root / "acme.yaml"
    assert link.is_symlink() and os.readlink(link) == f"{DATA}/acme.yaml"
    assert (tenants.root / DATA).is_symlink()
    assert os.readlink(tenants.root / DATA).startswith("..")


async def test_a_swapped_configmap_is_in_force_within_two_seconds(
    volumes: tuple[ConfigMapVolume, ConfigMapVolume],
) -> None:
    tenants, policies = volumes
    watcher = PolicyWatcher(tenants.root, policies.root, poll_interval_s=0.2, environ={})
    await watcher.start()
    try:
        before = watcher.current
        assert before.tenants["globex"].limits.base.requests_per_minute == 30
        assert set(before.tenants) == {"acme", "globex", "initech"}

        # An edited tenant.
        files = shipped("tenants")
        files["globex.yaml"] = edited_tenant("globex.yaml", limits={"requests_per_minute": 45})
        tenants.publish(files)
        await wait_for(watcher, lambda p: p.tenants["globex"].limits.base.requests_per_minute == 45)
        assert watcher.current.version != before.version
        assert watcher.last_error is None

        # A tenant added and one removed in the same update.
        files["newco.yaml"] = edited_tenant("globex.yaml", id="newco", display_name="NewCo")
        del files["initech.yaml"]
        tenants.publish(files)
        await wait_for(watcher, lambda p: set(p.tenants) == {"acme", "globex", "newco"})

        # A policy file: a priority class's queue limit.
        policy_files = shipped("policies")
        priorities = yaml.safe_load(policy_files["priorities.yaml"])
        priorities["priority_classes"]["batch"]["max_queue_length"] = 7
        policy_files["priorities.yaml"] = yaml.safe_dump(priorities)
        policies.publish(policy_files)
        await wait_for(watcher, lambda p: p.priority_classes["batch"].max_queue_length == 7)
    finally:
        await watcher.stop()


async def test_a_broken_configmap_keeps_the_last_good_policy(
    volumes: tuple[ConfigMapVolume, ConfigMapVolume],
) -> None:
    tenants, policies = volumes
    watcher = PolicyWatcher(tenants.root, policies.root, poll_interval_s=0.2, environ={})
    await watcher.start()
    try:
        good = watcher.current.version
        files = shipped("tenants")
        files["acme.yaml"] = "id: acme\nnot_a_key: 1\n"
        tenants.publish(files)
        assert await eventually(lambda: watcher.last_error is not None)
        assert watcher.current.version == good
        # Fixed again: back in force.
        tenants.publish(shipped("tenants"))
        await wait_for(watcher, lambda p: watcher.last_error is None and p.version == good)
    finally:
        await watcher.stop()
