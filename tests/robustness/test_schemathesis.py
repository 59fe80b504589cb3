"""Property-based fuzzing of every operation in ``/openapi.json`` with schemathesis.

A real gateway process (aiohttp is not ASGI/WSGI) with unlimited quotas, so generated
traffic is judged on its inputs, not throttled into 429s. Each operation gets positive
and negative cases; every response must be no 5xx, documented, schema-conformant, and
every non-2xx JSON body the OpenAI envelope with all four keys. Generation is
derandomized so a CI failure reproduces locally.
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)
from support import ADMIN_TOKEN, TOKENS, GatewayProcess, base_config, start_gateway

# Examples per operation; small operations (no parameters) exhaust their space early,
# so the total actually sent is counted and asserted in the last test.
EXAMPLES = 300
MIN_CASES = 1000
SENT: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()
BY_OP: Counter = Counter()

UNLIMITED = {"images_per_day": None, "images_per_month": None, "budget_usd_per_month": None,
             "requests_per_minute": None, "max_concurrent": None}


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    g = start_gateway(base_config(tmp, quota_defaults=UNLIMITED), tmp)
    yield g
    g.stop()


# The spec file the gateway serves (checked below to be the same document), loaded
# eagerly: schemathesis' lazy fixture loader does not work under pytest 9.
SPEC = Path(__file__).resolve().parents[2] / "gateway" / "openapi.json"
schema = schemathesis.openapi.from_path(SPEC)
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    deterministic=True, database="none")


@schemathesis.check
def openai_error_envelope(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                          case: schemathesis.Case) -> bool | None:
    """Every error a client can see must parse as the SDK's envelope, all keys present."""
    if response.status_code < 400:
        return None
    assert "application/json" in response.headers.get("content-type", [""])[0], (
        f"{response.status_code} is not JSON")
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert response.headers.get("x-request-id", [""])[0].startswith("req_")
    return True


def _headers(path: str) -> dict[str, str]:
    token = ADMIN_TOKEN if path.startswith("/admin") else TOKENS["alice"]
    return {"Authorization": f"Bearer {token}"}


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms(case: schemathesis.Case, fuzz_gateway: GatewayProcess) -> None:
    response = case.call_and_validate(
        base_url=fuzz_gateway.url, headers=_headers(case.path), timeout=30,
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance,
                openai_error_envelope])
    SENT[f"{case.method} {case.path}"] += 1
    STATUSES[response.status_code] += 1
    BY_OP[(case.method, case.path, response.status_code)] += 1


def test_served_spec_is_the_fuzzed_one(fuzz_gateway: GatewayProcess) -> None:
    with urllib.request.urlopen(fuzz_gateway.url + "/openapi.json") as r:
        assert json.load(r) == json.loads(SPEC.read_text())


def test_enough_cases_and_a_quiet_log(fuzz_gateway: GatewayProcess) -> None:
    """Runs after the fuzzing above: it sent enough cases and nothing crashed inside."""
    total = sum(SENT.values())
    assert total >= MIN_CASES, (total, BY_OP)
    assert STATUSES[200] > 0, BY_OP  # some generated requests did succeed
    assert not any(code >= 500 for code in STATUSES), STATUSES
    log = fuzz_gateway.log()
    assert "Traceback" not in log
    assert "unhandled_error" not in log
