"""Fixtures the fault tests share with the integration tests."""

from tests.integration.test_ledger import ledger_gateways  # noqa: F401  (a fixture)
