"""Fixtures for every test; the helpers themselves live in support.py."""

import pytest
from postgres_server import postgres_server  # noqa: F401
from redis_server import redis_server  # noqa: F401
from support import IN_CI, gateway_client, gateway_process, make_config  # noqa: F401
from upstream_cases import held_upstream  # noqa: F401


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under CI=true a skip is a failure: CI must install what every test needs."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which is not allowed: {report.longrepr}"
