"""`GET /admin/policies`: admins only, and it shows a rejected reload."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.processes import InProcessGateway


def test_admin_policies_needs_the_admin_role_and_reports_reload_errors(
    gateway: InProcessGateway, policy_dirs: tuple[Path, Path], mint: Callable[..., str]
) -> None:
    url = f"{gateway.url}/admin/policies"
    user = httpx.get(url, headers={"authorization": f"Bearer {mint()}"})
    assert user.status_code == 403
    assert user.json()["error"]["type"] == "permission_error"

    admin = {"authorization": f"Bearer {mint(roles=['admin'])}"}
    before = httpx.get(url, headers=admin).json()
    assert before["last_error"] is None
    assert "acme" in before["tenants"]

    tenants, _ = policy_dirs
    (tenants / "acme.yaml").write_text("id: acme\nnot_a_key: 1\n")
    deadline = time.monotonic() + 5
    after = before
    while time.monotonic() < deadline and after["last_error"] is None:
        time.sleep(0.1)
        after = httpx.get(url, headers=admin).json()
    assert after["last_error"] is not None
    assert any("acme.yaml" in issue["file"] for issue in after["last_error"]["issues"])
    assert after["version"] == before["version"]
    # The last good policy keeps serving.
    models = httpx.get(f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {mint()}"})
    assert models.status_code == 200
