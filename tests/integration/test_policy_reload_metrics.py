"""Policy reloads as /metrics shows them: a valid edit counts `ok`, a rejected
one counts `error` and clears `tollgate_policy_last_reload_success`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import StartGateway, gateway_env
from tests.integration.test_quota_http import point_at
from tests.support.processes import FakeUpstreamProcess, InProcessGateway
from tests.support.prometheus import Scrape, scrape


def replace_text(path: Path, old: str, new: str) -> None:
    """Edit a file the way editors save it: write beside, then rename over it,
    so the watcher never reads it half-written."""
    text = path.read_text()
    assert old in text
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text.replace(old, new))
    os.replace(temporary, path)


def wait_scrape(
    gw: InProcessGateway, done: Callable[[Scrape], bool], timeout_s: float = 10.0
) -> Scrape:
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(gw.url)
        if done(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError("the reload did not show in /metrics in time")
        time.sleep(0.1)


def test_reloads_are_counted_by_result(
    fake_upstream: FakeUpstreamProcess,
    policy_dirs: tuple[Path, Path],
    start_gateway: StartGateway,
) -> None:
    tenants, policies = policy_dirs
    point_at(policies, fake_upstream.url)
    gw = start_gateway(gateway_env(fake_upstream.url, tenants, policies))
    m = scrape(gw.url)
    assert m.get("tollgate_policy_reloads_total", result="ok") == 0
    assert m.get("tollgate_policy_reloads_total", result="error") == 0
    assert m.get("tollgate_policy_last_reload_success") == 1
    started_at = m.get("tollgate_policy_last_reload_timestamp_seconds")
    assert abs(started_at - time.time()) < 60

    acme = tenants / "acme.yaml"
    replace_text(acme, "display_name: ACME Corporation", "display_name: ACME Renamed")
    m = wait_scrape(gw, lambda m: m.get("tollgate_policy_reloads_total", result="ok") >= 1)
    assert m.get("tollgate_policy_reloads_total", result="ok") == 1
    assert m.get("tollgate_policy_reloads_total", result="error") == 0
    assert m.get("tollgate_policy_last_reload_success") == 1
    reloaded_at = m.get("tollgate_policy_last_reload_timestamp_seconds")
    assert reloaded_at > started_at

    replace_text(acme, "tier: standard", "tier: platinum")
    m = wait_scrape(gw, lambda m: m.get("tollgate_policy_reloads_total", result="error") >= 1)
    assert m.get("tollgate_policy_reloads_total", result="error") == 1
    assert m.get("tollgate_policy_reloads_total", result="ok") == 1
    assert m.get("tollgate_policy_last_reload_success") == 0
    assert m.get("tollgate_policy_last_reload_timestamp_seconds") > reloaded_at
