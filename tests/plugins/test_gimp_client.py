"""The GIMP plug-in's HTTP client (plugins/gimp/generate-variations/vg_client.py) against a
real gateway process: the hand-built multipart is accepted, every error envelope becomes
the right sentence, the usage call works. No GIMP needed."""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import threading
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "plugins" / "gimp" / "generate-variations"))
sys.path.insert(0, str(HERE / "gimp"))

import vg_client  # noqa: E402
from vg_gateway_proc import Gateway, raw_server, running_gateway, write_config  # noqa: E402

from gateway.errors import ApiError  # noqa: E402

ALICE = "alice-token-0123456789abcdef"
BOB_BLOCKED = "bob-token-0123456789abcdef"
CAROL_EMPTY = "carol-token-0123456789abcdef"
DAVE_SLOW = "dave-token-0123456789abcdef"


def png_bytes(w: int, h: int, mode: str = "RGB") -> bytes:
    img = Image.new(mode, (w, h))
    img.putdata([((x * 5) % 256, (y * 3) % 256, (x + y) % 256, 255)[: len(mode)]
                 for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gw-client")
    cfg = write_config(tmp, {
        "alice": {"token": ALICE, "quota": {"images_per_day": 200, "requests_per_minute": 100,
                                            "max_concurrent": 4}},
        "bob": {"token": BOB_BLOCKED, "quota": {"blocked": True}},
        "carol": {"token": CAROL_EMPTY, "quota": {"images_per_day": 0}},
        "dave": {"token": DAVE_SLOW, "quota": {"images_per_day": 100,
                                               "requests_per_minute": 1}},
    })
    with running_gateway(tmp, cfg) as gw:
        yield gw


def sentence_of(fn: Any, *args: Any, **kwargs: Any) -> vg_client.GatewayError:
    with pytest.raises(vg_client.GatewayError) as info:
        fn(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------ pure parts


def test_api_base_accepts_root_or_v1_urls() -> None:
    assert vg_client.api_base("http://h:8080") == "http://h:8080/v1"
    assert vg_client.api_base("http://h:8080/") == "http://h:8080/v1"
    assert vg_client.api_base("http://h:8080/v1/") == "http://h:8080/v1"
    assert vg_client.api_base("https://h/gw") == "https://h/gw/v1"
    assert vg_client.api_base("h:9000") == "http://h:9000/v1"
    assert "No gateway URL" in str(sentence_of(vg_client.api_base, ""))
    assert "not an http" in str(sentence_of(vg_client.api_base, "ftp://x"))


def test_multipart_body_is_well_formed() -> None:
    body, ctype = vg_client.build_multipart(
        {"n": "3", "size": "256x256"}, [("image", 'we"ird.png', "image/png", b"\x89PNG-bytes")],
        boundary="XyZ")
    assert ctype == "multipart/form-data; boundary=XyZ"
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
    parts = list(msg.iter_parts())
    assert [p.get_param("name", header="content-disposition") for p in parts] == [
        "n", "size", "image"]
    assert parts[0].get_content() == "3"
    assert parts[2].get_content_type() == "image/png"
    assert parts[2].get_payload(decode=True) == b"\x89PNG-bytes"
    assert body.endswith(b"--XyZ--\r\n")


def test_client_refuses_non_png_and_4mb_uploads() -> None:
    e = sentence_of(vg_client.request_variations, "http://127.0.0.1:9", "t", b"GIF89a",
                    n=1, size="256x256")
    assert e.kind == "client"
    big = vg_client.PNG_SIGNATURE + b"\0" * vg_client.MAX_UPLOAD
    e = sentence_of(vg_client.request_variations, "http://127.0.0.1:9", "t", big,
                    n=1, size="256x256")
    assert "less than 4 MB" in str(e)


# ------------------------------------------------------------------ real gateway


def test_multipart_accepted_and_images_returned(gateway: Gateway) -> None:
    src = png_bytes(64, 64)
    first = vg_client.request_variations(gateway.url, ALICE, src, n=2, size="256x256")
    assert len(first.images) == 2
    for data in first.images:
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == (256, 256)
    assert first.request_id
    assert first.cache in ("MISS", None)
    again = vg_client.request_variations(gateway.url + "/v1", ALICE, src, n=2, size="256x256")
    assert again.cache == "HIT"
    assert again.images == first.images
    fresh = vg_client.request_variations(gateway.url, ALICE, src, n=2, size="256x256",
                                         fresh=True)
    # no-cache: new images, never the cached ones.
    assert fresh.cache in ("MISS", "BYPASS")
    assert len(fresh.images) == 2
    assert set(fresh.images).isdisjoint(first.images)


def test_rgba_upload_and_other_sizes(gateway: Gateway) -> None:
    res = vg_client.request_variations(gateway.url, ALICE, png_bytes(40, 40, "RGBA"), n=1,
                                       size="512x512")
    assert Image.open(io.BytesIO(res.images[0])).size == (512, 512)


def test_no_token(gateway: Gateway) -> None:
    e = sentence_of(vg_client.request_variations, gateway.url, "", png_bytes(8, 8), n=1,
                    size="256x256")
    assert e.status == 401 and e.kind == "auth"
    assert str(e).startswith("The gateway needs a token and none was sent.")
    assert "Filters > Generate Variations Settings" in str(e)


def test_wrong_token_is_named_but_not_shown(gateway: Gateway) -> None:
    token = "sk-wrong-token-value-123456"
    e = sentence_of(vg_client.request_variations, gateway.url, token, png_bytes(8, 8), n=1,
                    size="256x256")
    assert e.status == 401 and e.code == "invalid_api_key"
    assert str(e).startswith("The gateway rejected your token")
    assert token not in str(e)


def test_blocked_user(gateway: Gateway) -> None:
    e = sentence_of(vg_client.request_variations, gateway.url, BOB_BLOCKED, png_bytes(8, 8),
                    n=1, size="256x256")
    assert e.status == 403 and e.kind == "blocked"
    assert "Your gateway account is blocked" in str(e)
    assert "admin" in str(e)


def test_quota_exhausted_says_how_many_remain_and_when_it_resets(gateway: Gateway) -> None:
    e = sentence_of(vg_client.request_variations, gateway.url, CAROL_EMPTY, png_bytes(8, 8),
                    n=2, size="256x256")
    assert e.status == 429 and e.code == "quota_exceeded" and e.kind == "quota"
    text = str(e)
    assert text.startswith("Your image quota on the gateway is used up: 0 of 0 images are left;"
                           " it resets in ")
    assert text.endswith("Ask for fewer variations, or wait until it resets.")


def test_rate_limited(gateway: Gateway) -> None:
    vg_client.request_variations(gateway.url, DAVE_SLOW, png_bytes(8, 8), n=1, size="256x256")
    e = sentence_of(vg_client.request_variations, gateway.url, DAVE_SLOW, png_bytes(8, 8),
                    n=1, size="256x256")
    assert e.status == 429 and e.code == "rate_limit_exceeded" and e.kind == "rate"
    assert str(e).startswith("Too many requests to the gateway right now")
    assert " Wait " in str(e) and "second" in str(e)


def test_bad_input_names_the_parameter(gateway: Gateway) -> None:
    # The plug-in always sends squares; a non-square PNG shows how 400s read.
    e = sentence_of(vg_client.request_variations, gateway.url, ALICE, png_bytes(30, 20), n=1,
                    size="256x256")
    assert e.status == 400 and e.kind == "bad_request"
    assert str(e).startswith("The gateway refused the request (parameter 'image'):")
    assert "30x20" in str(e)


def test_wrong_path_is_a_404_sentence(gateway: Gateway) -> None:
    e = sentence_of(vg_client.request_variations, gateway.url + "/not-here", ALICE,
                    png_bytes(8, 8), n=1, size="256x256")
    assert e.status == 404 and e.kind == "not_found"
    assert f"{gateway.url}/not-here/v1/images/variations" in str(e)


def test_usage_and_summary(gateway: Gateway) -> None:
    usage = vg_client.get_usage(gateway.url, ALICE)
    assert usage["user"] == "alice"
    day = usage["limits"]["images_per_day"]
    assert day["limit"] == 200
    text = vg_client.describe_usage(usage)
    assert text.startswith("Connected as alice: ")
    assert f"{day['remaining']} of 200 images left today (resets {day['resets_at']})" in text
    e = sentence_of(vg_client.get_usage, gateway.url, "nope-nope-nope-nope")
    assert e.kind == "auth"


def test_usage_summary_for_blocked_user(gateway: Gateway) -> None:
    usage = vg_client.get_usage(gateway.url, BOB_BLOCKED)
    assert usage["blocked"] is True
    assert "blocked" in vg_client.describe_usage(usage)


# ------------------------------------------------------------------ transport failures


def test_unreachable_gateway_names_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Closed now: nothing listens on that port.
    e = sentence_of(vg_client.request_variations, f"http://127.0.0.1:{port}", ALICE,
                    png_bytes(8, 8), n=1, size="256x256", timeout=5)
    assert e.kind == "unreachable"
    assert str(e).startswith(
        f"Could not reach the variations gateway at http://127.0.0.1:{port}/v1/images/"
        "variations: nothing is listening there (connection refused).")


def test_unknown_host() -> None:
    e = sentence_of(vg_client.get_usage, "http://no-such-host.invalid:8080", ALICE, timeout=5)
    assert e.kind == "unreachable"
    assert "host name is unknown" in str(e)


def test_timeout_names_the_limit() -> None:
    # A server that accepts the connection and never answers.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    port = srv.getsockname()[1]
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        e = sentence_of(vg_client.request_variations, f"http://127.0.0.1:{port}", ALICE,
                        png_bytes(8, 8), n=1, size="256x256", timeout=0.5)
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()
    assert e.kind == "timeout"
    assert str(e).startswith(
        f"The gateway at http://127.0.0.1:{port}/v1/images/variations did not answer within "
        "0.5 seconds.")


# ------------------------------------------------------------------ 5xx


def test_backend_timeout_then_paused_backend(tmp_path: Path) -> None:
    """A real 504 (the backend's time budget is 1 ms) and then a real 503 (the breaker
    pauses the failing backend) from the gateway."""
    cfg = write_config(tmp_path, {"alice": {"token": ALICE}}, backends=[{
        "name": "slow", "kind": "procedural", "timeout_seconds": 0.001,
        "retry": {"max_attempts": 1},
        "breaker": {"failure_threshold": 1, "cooldown_seconds": 600}}])
    src = png_bytes(300, 300)
    with running_gateway(tmp_path, cfg) as gw:
        e = sentence_of(vg_client.request_variations, gw.url, ALICE, src, n=10,
                        size="1024x1024")
        assert (e.status, e.code, e.kind) == (504, "upstream_timeout", "timeout")
        assert str(e).startswith("The image backend behind the gateway took too long and the "
                                 "gateway gave up.")
        assert e.request_id and e.request_id in str(e)
        e = sentence_of(vg_client.request_variations, gw.url, ALICE, src, n=10,
                        size="1024x1024")
        assert (e.status, e.code, e.kind) == (503, "upstream_unavailable", "backend")
        assert str(e).startswith("The gateway's image backend is down or failing (")
        assert ". Try again in " in str(e)


# ------------------------------------------------------------------ 5xx envelopes


def envelope(status: int, message: str, code: str | None) -> bytes:
    """The exact body the gateway writes for this error."""
    return json.dumps(ApiError(status, message, code=code).body()).encode()


@pytest.mark.parametrize(
    ("status", "code", "headers", "start", "kind"),
    [
        (502, "upstream_error", {}, "The gateway's image backend is down or failing "
         "(backend said no). Try again later.", "backend"),
        (503, "upstream_unavailable", {"retry-after": "30"}, "The gateway's image backend is "
         "down or failing (backend said no). Try again in 30 seconds.", "backend"),
        (504, "upstream_timeout", {}, "The image backend behind the gateway took too long",
         "timeout"),
        (500, "internal_error", {}, "The gateway failed (HTTP 500): backend said no", "server"),
        (503, "storage_unavailable", {}, "The gateway cannot store images right now: its "
         "disk is full", "server"),
    ],
)
def test_backend_errors_read_as_sentences(
    status: int, code: str, headers: dict[str, str], start: str, kind: str
) -> None:
    headers = {**headers, "x-request-id": "req_123"}
    e = vg_client.error_sentence(status, envelope(status, "backend said no", code), headers,
                                 "http://gw/v1/images/variations")
    assert str(e).startswith(start)
    assert e.kind == kind
    assert "req_123" in str(e)


def test_non_json_proxy_error() -> None:
    e = vg_client.error_sentence(502, b"<html>Bad Gateway</html>", {}, "http://gw/v1/x")
    assert str(e).startswith("The gateway at http://gw/v1/x answered HTTP 502 Bad Gateway "
                             "without an error message")


def test_quota_sentence_from_headers_only() -> None:
    body = envelope(429, "Quota exceeded", "quota_exceeded")
    e = vg_client.error_sentence(429, body, {"x-ratelimit-limit-images": "200",
                                             "x-ratelimit-remaining-images": "1",
                                             "x-ratelimit-reset-images": "6h0m0s"}, "u")
    assert str(e) == ("Your image quota on the gateway is used up: 1 of 200 images are left; "
                      "it resets in 6h0m0s. Ask for fewer variations, or wait until it resets.")
    e = vg_client.error_sentence(429, body, {"retry-after": "7200"}, "u")
    assert "it resets in 2 h 0 min" in str(e)


def test_b64_payload_is_decoded() -> None:
    raw = png_bytes(4, 4)
    assert base64.b64decode(base64.b64encode(raw)) == raw


# ------------------------------------------------------------------ not a gateway at all


def both_calls(url: str) -> list[vg_client.GatewayError]:
    """The error of the variations call and of the usage call against ``url``."""
    return [
        sentence_of(vg_client.request_variations, url, ALICE, png_bytes(8, 8), n=1,
                    size="256x256", timeout=5),
        sentence_of(vg_client.get_usage, url, ALICE, timeout=5),
    ]


REDIS_ERR = b"-ERR unknown command 'POST', with args beginning with: 'Bearer " + \
    ALICE.encode() + b"'\r\n"


@pytest.mark.parametrize("answer", [
    REDIS_ERR,
    b"-ERR unknown command\r\n",
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",
], ids=["redis-echoing-the-token", "redis", "ssh", "bad-status", "long-header",
        "too-many-headers"])
def test_a_server_that_does_not_speak_http_is_named_as_such(answer: bytes) -> None:
    with raw_server(answer) as url:
        errors = both_calls(url)
    for e, path in zip(errors, ("/v1/images/variations", "/v1/usage"), strict=True):
        assert e.kind == "protocol"
        assert str(e) == (
            f"The server at {url}{path} did not answer like a variations gateway (is the URL "
            "right?). Check the gateway URL in Filters > Generate Variations Settings.")
        assert ALICE not in str(e)


def test_a_server_that_closes_without_answering() -> None:
    with raw_server(b"") as url:
        errors = both_calls(url)
    for e in errors:
        assert e.kind == "protocol"
        assert str(e).startswith(f"The server at {url}/v1/")
        assert "closed the connection without answering" in str(e)


@pytest.mark.parametrize(("answer", "got"), [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
     b'{"data": [', "got 10 bytes, 990 more were expected"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
     b'\r\n64\r\n{"data": [', "got "),
], ids=["content-length", "chunked"])
def test_an_answer_cut_off_mid_body(answer: bytes, got: str) -> None:
    with raw_server(answer) as url:
        errors = both_calls(url)
    for e in errors:
        assert e.kind == "protocol"
        assert str(e).startswith(f"The answer of the gateway at {url}/v1/")
        assert "was cut off (" + got in str(e)
        assert ALICE not in str(e)


def test_an_error_answer_cut_off_mid_body() -> None:
    answer = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
              b'Content-Length: 1000\r\n\r\n{"error": {"message": "')
    with raw_server(answer) as url:
        errors = both_calls(url)
    for e in errors:
        assert e.status == 500
        assert str(e).startswith(f"The gateway at {url}/v1/")
        assert "answered HTTP 500 without an error message" in str(e)


@pytest.mark.parametrize("body", [b"<html>hello</html>", b'{"data": {"a": 1}}', b"[1, 2]"])
def test_a_web_server_that_is_not_a_gateway(body: bytes) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n"
              % len(body)) + body
    with raw_server(answer) as url:
        if body.startswith(b"{"):  # a JSON object is a (meaningless) usage answer
            errors = [sentence_of(vg_client.request_variations, url, ALICE, png_bytes(8, 8),
                                  n=1, size="256x256", timeout=5)]
            vg_client.describe_usage(vg_client.get_usage(url, ALICE, timeout=5))
        else:
            errors = both_calls(url)
    for e in errors:
        assert e.kind == "protocol"
        assert "cannot read" in str(e)


def test_usage_with_odd_limits_still_reads() -> None:
    assert vg_client.describe_usage({"user": "x", "limits": []}) == (
        "Connected as x; no image limits apply.")


def test_bad_url_and_token_are_settings_sentences() -> None:
    for url in ("http://gw:notaport", "http://gw:99999", "http://[::1"):
        e = sentence_of(vg_client.get_usage, url, ALICE)
        assert e.kind == "settings" and "not a valid address" in str(e)
    token = "tok-with\nnewline-0123456789"
    e = sentence_of(vg_client.get_usage, "http://127.0.0.1:9", token)
    assert e.kind == "settings"
    assert "tok-with" not in str(e) and "newline" not in str(e)


def test_the_token_goes_only_to_the_gateway_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Image URLs are signed; one on another host (a CDN behind public_base_url) must not
    receive the member's token."""
    sent: dict[str, dict[str, str]] = {}

    def call(req: Any, url: str, timeout: float) -> tuple[bytes, dict[str, str]]:
        sent[url] = dict(req.header_items())
        return b"png", {}

    monkeypatch.setattr(vg_client, "_call", call)
    api = "http://gw.example:8080/v1/images/variations"
    vg_client._download("/v1/images/files/a.png?sig=1", api, ALICE, 5)
    vg_client._download("https://cdn.example/v1/images/files/b.png?sig=1", api, ALICE, 5)
    own, cdn = sent["http://gw.example:8080/v1/images/files/a.png?sig=1"], \
        sent["https://cdn.example/v1/images/files/b.png?sig=1"]
    assert own["Authorization"] == f"Bearer {ALICE}"
    assert "Authorization" not in cdn
