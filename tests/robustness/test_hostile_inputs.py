"""The hostile-input corpus (hostile_corpus.py) against a real gateway over raw sockets.

Each case: the documented status (or, for broken HTTP framing, a 4xx or a close), the
OpenAI envelope with its param/code, never a 5xx, never a hang, and the gateway still
ready afterwards. At the end: only the accepted cases were charged, and the gateway's
log holds no traceback.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest
from hostile_corpus import CASES, Case, by_name
from rawhttp import exchange
from support import TOKENS, GatewayProcess, base_config, start_gateway

# Cases the gateway served (n=1 at 256x256) -> images charged: a cache hit (two cases
# with the same pixels, e.g. both APNGs' first frame) costs nothing.
ACCEPTED: dict[str, int] = {}


@pytest.fixture(scope="module")
def hostile_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("hostile")
    # A short read deadline so the slowloris case is cut off in seconds.
    g = start_gateway(base_config(tmp, server={"read_timeout_seconds": 2.0}), tmp)
    yield g
    g.stop()


def get_json(url: str, token: str = TOKENS["alice"]) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.load(r)


def test_corpus_is_big_and_named_uniquely() -> None:
    assert len(by_name()) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(hostile_gateway: GatewayProcess, case: Case) -> None:
    outcome = exchange(hostile_gateway.url, case.build())
    resp = outcome.response
    got = None if resp is None else resp.status
    allowed = {case.status, *case.also}
    assert got in allowed, (got, resp.body[:300] if resp else outcome)
    if resp is not None:
        assert resp.status < 500
        if resp.status == 200:
            body = resp.json()
            assert len(body["data"]) == 1 and case.charged == 1
            ACCEPTED[case.name] = 0 if resp.headers["x-cache"] == "HIT" else 1
        elif case.envelope:
            assert resp.headers["content-type"].startswith("application/json")
            error = resp.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["message"] and error["type"]
            assert "Error(" not in error["message"]  # no Python reprs leak out
            assert resp.headers["x-request-id"].startswith("req_")
            if resp.status == case.status:
                assert (error["param"], error["code"]) == (case.param, case.code), error
    # The gateway survived it and still answers.
    status, ready = get_json(hostile_gateway.url + "/readyz")
    assert status == 200 and ready["status"] == "ready"


def test_only_accepted_cases_were_charged(hostile_gateway: GatewayProcess) -> None:
    """Runs last: refusals cost nothing, and nothing crashed inside the gateway."""
    _, usage = get_json(hostile_gateway.url + "/v1/usage")
    expected = sum(ACCEPTED.values())
    assert usage["limits"]["images_per_day"]["used"] == expected, (ACCEPTED, usage)
    log = hostile_gateway.log()
    assert "Traceback" not in log, log[-3000:]
    assert "unhandled_error" not in log
    assert '"status": 5' not in log
