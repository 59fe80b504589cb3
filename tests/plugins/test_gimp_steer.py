"""The plug-in's steering logic (plugins/gimp/generate-variations/vg_steer.py, issue 22):
which controls a model honours, what a run sends, the group name, the parasite record and
"More like this". No GIMP needed; the model list comes from a small HTTP server."""

from __future__ import annotations

import base64
import json
import random
import re
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "plugins" / "gimp" / "generate-variations"))

import vg_client  # noqa: E402
import vg_steer  # noqa: E402

# The contract of issue 22: a model object lists only the controls its route honours.
ALL = {"strength": {"default": 0.35}, "seed": {}, "prompt": {"max_length": 1000}}
MODELS = {"object": "list", "data": [
    {"id": "dall-e-2", "object": "model", "controls": ALL},
    {"id": "local", "object": "model", "controls": {"strength": {"default": 0.5},
                                                      "seed": {}}},
    {"id": "openai", "object": "model", "controls": {}},
]}


def test_controls_read_from_the_model_list() -> None:
    models = vg_steer.parse_models(MODELS)
    assert models.ids == ("dall-e-2", "local", "openai")
    c = models.of("")  # the gateway's default route
    assert (c.strength, c.strength_default, c.seed, c.prompt, c.prompt_max) == (
        True, 0.35, True, True, 1000)
    local = models.of("local")
    assert (local.strength, local.strength_default, local.seed, local.prompt) == (
        True, 0.5, True, False)
    assert local.tooltip("strength", "local") is None
    why = local.tooltip("prompt", "local")
    assert why is not None and "'local' cannot use a hint" in why
    none = models.of("openai")
    assert none.known and not (none.strength or none.seed or none.prompt)


def test_an_older_gateway_or_an_unknown_model_leaves_the_controls_editable_with_a_reason(
        ) -> None:
    """The gateway said nothing: plan() sends what is set, so the dialog must show it
    (before: greyed out, yet last run's hidden values went out)."""
    old = vg_steer.parse_models({"data": [{"id": "dall-e-2", "object": "model"}]})
    c = old.of("")
    assert not c.known and not (c.strength or c.seed or c.prompt)
    assert "older than this plug-in" in (c.tooltip("seed", "dall-e-2") or "")
    assert all(c.editable(k) for k in ("strength", "seed", "prompt"))
    local = vg_steer.parse_models(MODELS).of("local")  # known: only what it honours
    assert [local.editable(k) for k in ("strength", "seed", "prompt")] == [True, True, False]
    missing = vg_steer.parse_models(MODELS).of("gone")
    assert "no model 'gone'" in (missing.tooltip("strength", "gone") or "")
    # Odd values are ignored, not trusted.
    odd = vg_steer.controls_of({"controls": {"strength": {"default": 7},
                                             "prompt": {"max_length": "x"}}}, "m")
    assert odd.strength and odd.strength_default is None and odd.prompt_max == 1000


def test_only_set_and_honoured_controls_are_sent() -> None:
    models = vg_steer.parse_models(MODELS)
    rng = random.Random(7)
    s = vg_steer.plan(models.of(""), model="", strength=0.4000000059604645, seed=1234,
                      hint="  autumn   colours ", n=4, rng=rng)
    assert s.fields() == {"strength": "0.4", "seed": "1234", "prompt": "autumn colours"}
    # Nothing set: no strength, no hint; a random seed is drawn so it can be shown and reused.
    s = vg_steer.plan(models.of(""), model="", strength=vg_steer.MODEL_DEFAULT,
                      seed=vg_steer.RANDOM_SEED, hint="", n=10, rng=rng)
    assert set(s.fields()) == {"seed"}
    assert s.seed is not None and 0 <= s.seed <= vg_steer.SEED_MAX - 9
    # A model that honours no hint: the hint stays home; a named model is sent.
    s = vg_steer.plan(models.of("local"), model="local", strength=0.8, seed=5,
                      hint="autumn", n=2)
    assert s.fields() == {"model": "local", "strength": "0.8", "seed": "5"}
    # A model honouring nothing: exactly OpenAI's request.
    s = vg_steer.plan(models.of("openai"), model="", strength=0.8, seed=5, hint="x", n=2)
    assert s.fields() == {}


def test_controls_set_are_sent_when_the_gateway_did_not_say_what_it_honours() -> None:
    """/v1/models timed out, failed or is older: dropping the controls would charge a run
    made without them, so they go out and the gateway refuses what it cannot honour."""
    for controls in (vg_steer.unknown("down"), vg_steer.parse_models(
            {"data": [{"id": "dall-e-2", "object": "model"}]}).of("")):
        s = vg_steer.plan(controls, model="", strength=0.8, seed=5, hint=" x  y ", n=2)
        assert s.fields() == {"strength": "0.8", "seed": "5", "prompt": "x y"}
        # Nothing set: nothing sent (a random seed is not the artist's choice).
        s = vg_steer.plan(controls, model="", strength=vg_steer.MODEL_DEFAULT,
                          seed=vg_steer.RANDOM_SEED, hint="", n=2)
        assert s.fields() == {}
    with pytest.raises(vg_steer.SteerError, match="at most 1000"):
        vg_steer.plan(vg_steer.unknown("down"), model="", strength=0.5, seed=1,
                      hint="x" * 1001, n=1)


@pytest.mark.parametrize(("kw", "words"), [
    ({"strength": 1.5}, "between 0 and 1"),
    ({"seed": -7}, "whole number from 0 to 2147483647"),
    ({"hint": "x" * 1001}, "1001 characters long; the gateway takes at most 1000"),
])
def test_values_no_gateway_takes_are_a_sentence(kw: dict[str, Any], words: str) -> None:
    args: dict[str, Any] = {"model": "", "strength": 0.5, "seed": 1, "hint": "", "n": 1,
                            **kw}
    with pytest.raises(vg_steer.SteerError, match=words):
        vg_steer.plan(vg_steer.parse_models(MODELS).of(""), **args)


def test_group_name_carries_the_settings_that_were_sent() -> None:
    name = vg_steer.group_name
    assert name("Dusk", vg_steer.Steer(strength=0.4, seed=1234)) == \
        "Variations of Dusk - strength 0.4, seed 1234"
    assert name("Dusk", vg_steer.Steer()) == "Variations of Dusk"
    assert name("Dusk", vg_steer.Steer(model="local", seed=0, prompt="autumn colours")) == \
        'Variations of Dusk - model local, seed 0, hint "autumn colours"'
    long = name("Dusk", vg_steer.Steer(prompt="y" * 80))
    assert long.endswith('hint "' + "y" * 39 + '…"')


def test_records_round_trip_and_give_each_layer_its_seed() -> None:
    steer = vg_steer.Steer(strength=0.4, seed=1234, prompt="autumn")
    recs = vg_steer.records(steer, request_id="req_1", n=3, size="512x512",
                            square_mode="pad", scale_to_source=True, source_tattoo=9,
                            source_name="Dusk", selection=[10, 20, 100, 50])
    assert [r.index for r in recs] == [0, 1, 2, 3]
    assert [r.seed for r in recs] == [1234, 1234, 1235, 1236]
    data = json.loads(recs[2].to_json())
    assert {k: data[k] for k in ("model", "strength", "seed", "hint", "request_id")} == {
        "model": "dall-e-2", "strength": 0.4, "seed": 1235, "hint": "autumn",
        "request_id": "req_1"}
    assert vg_steer.read_record(recs[2].to_json()) == recs[2]
    for junk in (None, b"not json", b"[]", b'{"version": 99}', b"\xff"):
        assert vg_steer.read_record(junk) is None


def test_more_like_this_keeps_the_settings_and_takes_the_next_seeds() -> None:
    recs = vg_steer.records(vg_steer.Steer(model="local", strength=0.4, seed=1234,
                                           prompt="autumn"),
                            request_id=None, n=4, size="256x256", square_mode="stretch",
                            scale_to_source=False, source_tattoo=3, source_name="Dusk",
                            selection=None)
    more = vg_steer.more_like_this(recs[2])  # any layer of the group: same answer
    assert more == vg_steer.more_like_this(recs[0])
    assert more == vg_steer.MoreLikeThis(model="local", strength=0.4, seed=1238,
                                         hint="autumn", n=4, size="256x256",
                                         square_mode="stretch", scale_to_source=False)
    # Nothing was sent before: still nothing (the model's default, a random seed).
    plain = vg_steer.records(vg_steer.Steer(), request_id=None, n=2, size="512x512",
                             square_mode="pad", scale_to_source=True, source_tattoo=1,
                             source_name="x", selection=None)[1]
    m = vg_steer.more_like_this(plain)
    assert (m.model, m.strength, m.seed, m.hint) == (
        "", vg_steer.MODEL_DEFAULT, vg_steer.RANDOM_SEED, "")


@pytest.fixture
def models_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Answers GET /v1/models with MODELS (and records the headers it got)."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, **dict(self.headers)})
            body = json.dumps(MODELS).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


def test_model_controls_asks_the_gateway_with_the_token(
        models_server: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = models_server
    c = vg_steer.model_controls(url, "tok-123", "local")
    assert c.known and c.strength_default == 0.5 and not c.prompt
    assert seen[0]["path"] == "/v1/models"
    assert seen[0]["Authorization"] == "Bearer tok-123"


def test_a_gateway_that_cannot_be_asked_sends_no_controls() -> None:
    from support import free_port

    url = f"http://127.0.0.1:{free_port()}"
    c = vg_steer.model_controls(url, "tok", "")
    assert not c.known
    assert "Could not ask the gateway which controls this model honours: Could not reach" \
        in (c.tooltip("seed", "dall-e-2") or "")
    with pytest.raises(vg_client.GatewayError):
        vg_steer.get_models(url, "tok")


def test_a_gateway_whose_model_list_fails_still_gets_the_controls() -> None:
    """GET /v1/models answers 500 (the gateway's envelope); the run that follows still
    carries the seed, strength and hint the artist set (before: silently dropped)."""
    posted: list[set[str]] = []
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the gateway's 500 envelope (gateway/errors.py)
            self._send(500, {"error": {"message": "Internal server error",
                                       "type": "server_error", "param": None,
                                       "code": "internal_error"}})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posted.append(set(re.findall(rb'name="([a-z_]+)"', body)))
            self._send(200, {"created": 1, "data": [
                {"b64_json": base64.b64encode(png).decode()}]})

        def _send(self, status: int, data: Any) -> None:
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        controls = vg_steer.model_controls(url, "tok", "")
        assert not controls.known
        steer = vg_steer.plan(controls, model="", strength=0.3, seed=77, hint="dusk", n=1)
        vg_client.request_variations(url, "tok", png, n=1, size="256x256", timeout=5,
                                     extra=steer.fields())
    finally:
        srv.shutdown()
        srv.server_close()
    assert {b"strength", b"seed", b"prompt"} <= posted[0]


# ------------------------------------------------------------------ hostile records


def good_record() -> dict[str, Any]:
    rec = vg_steer.records(vg_steer.Steer(strength=0.4, seed=1234, prompt="autumn"),
                           request_id="req_1", n=3, size="512x512", square_mode="pad",
                           scale_to_source=True, source_tattoo=9, source_name="Dusk",
                           selection=[10, 20, 100, 50])[1]
    data: dict[str, Any] = json.loads(rec.to_json())
    return data


@pytest.mark.parametrize("changes", [
    {"first_seed": "5"}, {"n": "4"}, {"source_tattoo": "2"},  # crashed More like this
    {"n": 0}, {"n": 11}, {"n": 500}, {"n": True}, {"n": 2.0},
    {"size": "4096x4096"}, {"size": None},
    {"square_mode": "tile"},
    {"strength": 1.5}, {"strength": -0.1}, {"strength": "0.4"}, {"strength": True},
    {"seed": -1}, {"seed": 2147483648}, {"first_seed": 2 ** 40}, {"seed": 1.5},
    {"hint": "x" * 1001}, {"hint": "autumn\ncolours"}, {"hint": "a\u202eb"}, {"hint": 5},
    {"model": ""}, {"model": "m" * 101}, {"model": "gpt\x00"}, {"model": ["dall-e-2"]},
    {"request_id": "r\n"}, {"scale_to_source": 1}, {"index": 7}, {"index": -1},
    {"selection": [0, 0, 0, 10]}, {"selection": [0, 0, 10]}, {"selection": "0,0,1,1"},
    {"selection": [0, 0, 10, "10"]}, {"source_tattoo": 0}, {"source_name": 3},
    {"version": 2}, {"version": True}, {"extra": 1},
])
def test_a_record_the_plug_in_did_not_write_is_refused(changes: dict[str, Any]) -> None:
    data = {**good_record(), **changes}
    assert vg_steer.read_record(json.dumps(data)) is None, changes


@pytest.mark.parametrize("missing", ["n", "source_tattoo", "version", "model"])
def test_a_record_missing_a_field_is_refused(missing: str) -> None:
    data = good_record()
    del data[missing]
    assert vg_steer.read_record(json.dumps(data)) is None


def test_every_record_the_plug_in_writes_reads_back() -> None:
    data = good_record()
    assert vg_steer.read_record(json.dumps(data)) is not None
    for steer in (vg_steer.Steer(), vg_steer.Steer(model="local", strength=1, seed=0),
                  vg_steer.Steer(prompt="é" * 1000, seed=vg_steer.SEED_MAX - 9)):
        for rec in vg_steer.records(steer, request_id=None, n=10, size="1024x1024",
                                    square_mode="selection-or-center-crop",
                                    scale_to_source=False, source_tattoo=None,
                                    source_name="", selection=None):
            assert vg_steer.read_record(rec.to_json()) == rec


@pytest.mark.parametrize(("model", "seed", "hint"), [
    ("", vg_steer.SEED_MAX, "autumn"),  # the gateway takes it: image i is seed + i
    ("", 5, "family \U0001F468\u200d\U0001F469 at dusk \u202e"),  # ZWJ, bidi override
    ("m" * vg_steer.MODEL_MAX, 0, " two\n lines "),
])
def test_what_plan_sends_is_always_a_record_the_plug_in_reads_back(
        model: str, seed: int, hint: str) -> None:
    """Review: a seed near the top, a hint with a zero-width joiner or a long request id
    made records More like this then refused as "not one the plug-in wrote"."""
    steer = vg_steer.plan(vg_steer.parse_models(MODELS).of(""), model=model, strength=0.5,
                          seed=seed, hint=hint, n=10)
    assert steer.seed == seed and steer.prompt and steer.prompt.isprintable()
    for rec in vg_steer.records(steer, request_id="r" * 200, n=10,
                                size="512x512", square_mode="pad", scale_to_source=True,
                                source_tattoo=3, source_name="Dusk", selection=None):
        assert vg_steer.read_record(rec.to_json()) == rec
    with pytest.raises(vg_steer.SteerError, match="printable"):
        vg_steer.plan(vg_steer.parse_models(MODELS).of(""), model="m" * 101, strength=0.5,
                      seed=seed, hint=hint, n=1)
