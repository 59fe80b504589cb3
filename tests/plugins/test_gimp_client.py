"""The GIMP plug-in's HTTP client (plugins/gimp/generate-variations/vg_client.py and
the vg_http, vg_multipart and vg_errors modules it uses) against a
real gateway process: the hand-built multipart is accepted, every error envelope becomes
the right sentence, the usage call works. No GIMP needed."""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import queue
import socket
import ssl
import sys
import threading
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "plugins" / "gimp" / "generate-variations"))
sys.path.insert(0, str(HERE / "gimp"))

import vg_client  # noqa: E402
import vg_errors  # noqa: E402
import vg_http  # noqa: E402
import vg_multipart  # noqa: E402
import vg_settings  # noqa: E402
import vg_steer  # noqa: E402
from tls_certs import make_test_ca  # noqa: E402
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
    assert vg_http.api_base("http://h:8080") == "http://h:8080/v1"
    assert vg_http.api_base("http://h:8080/") == "http://h:8080/v1"
    assert vg_http.api_base("http://h:8080/v1/") == "http://h:8080/v1"
    assert vg_http.api_base("https://h/gw") == "https://h/gw/v1"
    assert vg_http.api_base("h:9000") == "http://h:9000/v1"
    assert "No gateway URL" in str(sentence_of(vg_http.api_base, ""))
    assert "not an http" in str(sentence_of(vg_http.api_base, "ftp://x"))


def test_multipart_body_is_well_formed() -> None:
    body, ctype = vg_multipart.build_multipart(
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
    e = vg_errors.error_sentence(status, envelope(status, "backend said no", code), headers,
                                 "http://gw/v1/images/variations")
    assert str(e).startswith(start)
    assert e.kind == kind
    assert "req_123" in str(e)


def test_non_json_proxy_error() -> None:
    e = vg_errors.error_sentence(502, b"<html>Bad Gateway</html>", {}, "http://gw/v1/x")
    assert str(e).startswith("The gateway at http://gw/v1/x answered HTTP 502 Bad Gateway "
                             "without an error message")


def test_quota_sentence_from_headers_only() -> None:
    body = envelope(429, "Quota exceeded", "quota_exceeded")
    e = vg_errors.error_sentence(429, body, {"x-ratelimit-limit-images": "200",
                                             "x-ratelimit-remaining-images": "1",
                                             "x-ratelimit-reset-images": "6h0m0s"}, "u")
    assert str(e) == ("Your image quota on the gateway is used up: 1 of 200 images are left; "
                      "it resets in 6h0m0s. Ask for fewer variations, or wait until it resets.")
    e = vg_errors.error_sentence(429, body, {"retry-after": "7200"}, "u")
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

    def call(req: Any, url: str, timeout: float, **_: Any) -> tuple[bytes, dict[str, str]]:
        sent[url] = dict(req.header_items())
        return b"png", {}

    monkeypatch.setattr(vg_http, "call", call)
    api = "http://gw.example:8080/v1/images/variations"
    vg_client._download("/v1/images/files/a.png?sig=1", api, ALICE, 5)
    vg_client._download("https://cdn.example/v1/images/files/b.png?sig=1", api, ALICE, 5)
    own, cdn = sent["http://gw.example:8080/v1/images/files/a.png?sig=1"], \
        sent["https://cdn.example/v1/images/files/b.png?sig=1"]
    assert own["Authorization"] == f"Bearer {ALICE}"
    assert "Authorization" not in cdn


# ------------------------------------------------------------------ issue 19: redirects

Route = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]


@dataclass
class Seen:
    """One request a test server received."""

    method: str
    path: str
    headers: dict[str, str]


@contextlib.contextmanager
def http_server(route: Route, tls: ssl.SSLContext | None = None) -> Iterator[
        tuple[str, list[Seen]]]:
    """A small HTTP(S) server on 127.0.0.1 that records every request's method, path and
    headers (lower-case names) and answers with ``route(handler)``; yields its base URL
    and the record."""
    seen: list[Seen] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            seen.append(Seen(self.command, self.path,
                             {k.lower(): v for k, v in self.headers.items()}))
            status, headers, body = route(self)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    scheme = "https" if tls is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


def json_answer(data: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()


USAGE = {"user": "alice", "blocked": False, "limits": {}}
REDIRECT_CODES = (301, 302, 303, 307, 308)


@pytest.mark.parametrize("code", REDIRECT_CODES)
def test_api_calls_follow_no_redirect_and_name_its_target(code: int) -> None:
    """A 3xx from the gateway URL (a moved gateway, a proxy sending http to https, a
    hostile server) is a sentence naming the target; the server it points at, on another
    port, receives nothing, so never the token (urllib would follow 301/302/303 for the
    POST and all five for the GET, Authorization included)."""
    with http_server(lambda h: json_answer(USAGE)) as (other, other_seen), \
            http_server(lambda h: (code, {"Location": other + h.path + "?sig=s3cret"}, b"")
                        ) as (gw, gw_seen):
        errors = both_calls(gw)
    assert other_seen == []
    assert [s.headers.get("authorization") for s in gw_seen] == [f"Bearer {ALICE}"] * 2
    for e, path in zip(errors, ("/v1/images/variations", "/v1/usage"), strict=True):
        assert (e.kind, e.status) == ("redirect", code)
        assert str(e).startswith(
            f"The gateway URL answered with a redirect (HTTP {code}) from {gw}{path} to "
            f"{other}{path}. GIMP does not follow redirects")
        assert "Filters > Generate Variations Settings" in str(e)
        assert "s3cret" not in str(e) and ALICE not in str(e)


def test_a_relative_redirect_is_named_in_full() -> None:
    with http_server(lambda h: (302, {"Location": "/gateway/v1/usage"}, b"")) as (gw, _):
        e = sentence_of(vg_client.get_usage, gw, ALICE, timeout=5)
    assert e.kind == "redirect"
    assert f"to {gw}/gateway/v1/usage." in str(e)


def test_image_downloads_never_carry_the_token_off_the_gateway() -> None:
    """url items: one on the gateway that redirects to another origin, one on another
    origin outright. The other origin gets both requests, neither with the token; the
    gateway itself gets it (its own signed URL)."""
    png = png_bytes(8, 8)
    with http_server(lambda h: (200, {"Content-Type": "image/png"}, png)) as (cdn, cdn_seen):
        def gateway(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
            if h.command == "POST":
                return json_answer({"created": 1, "data": [
                    {"url": "/v1/images/files/a.png?sig=1"}, {"url": cdn + "/b.png?sig=2"}]})
            return 302, {"Location": cdn + "/a.png?sig=1"}, b""

        with http_server(gateway) as (gw, gw_seen):
            res = vg_client.request_variations(gw, ALICE, png, n=2, size="256x256", timeout=5)
    assert res.images == [png, png]
    assert [(s.method, s.path) for s in gw_seen] == [
        ("POST", "/v1/images/variations"), ("GET", "/v1/images/files/a.png?sig=1")]
    assert all(s.headers.get("authorization") == f"Bearer {ALICE}" for s in gw_seen)
    assert sorted(s.path for s in cdn_seen) == ["/a.png?sig=1", "/b.png?sig=2"]
    assert all("authorization" not in s.headers for s in cdn_seen)


# ------------------------------------------------------------------ issue 19: studio CA


@dataclass
class StudioCA:
    ca: Path
    server: ssl.SSLContext


@pytest.fixture(scope="module")
def studio_ca(tmp_path_factory: pytest.TempPathFactory) -> StudioCA:
    """A throw-away CA and a server certificate for 127.0.0.1 it signed (tests/tls_certs.py,
    shared with the gateway's own TLS tests)."""
    made = make_test_ca(tmp_path_factory.mktemp("studio-ca"))
    return StudioCA(made.ca, made.server_context())


def test_https_gateway_with_a_private_ca(studio_ca: StudioCA, tmp_path: Path) -> None:
    """Without the CA file: the 'not trusted' sentence (never the old 'check http:// or
    https://', which pushed people to plain http). With it, from the settings file or
    VARIATIONS_GATEWAY_CA_FILE: both calls work."""
    png = png_bytes(8, 8)

    def gateway(h: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        if h.command == "POST":
            return json_answer({"created": 1, "data": [
                {"b64_json": base64.b64encode(png).decode()}]})
        return json_answer(USAGE)

    with http_server(gateway, tls=studio_ca.server) as (url, seen):
        assert url.startswith("https://")
        for e in both_calls(url):
            assert e.kind == "untrusted"
            assert "the certificate is not trusted: add your studio's CA file in Settings" \
                in str(e)
            assert "VARIATIONS_GATEWAY_CA_FILE" in str(e)
            assert "(http:// or https://)" not in str(e)
        assert seen == []  # no request went out over the unverified connection

        assert vg_client.get_usage(url, ALICE, timeout=5, ca_file=str(studio_ca.ca)) == USAGE
        vg_settings.save(str(tmp_path), url, ALICE, 30, ca_file=str(studio_ca.ca))
        for env in ({}, {vg_settings.ENV_CA_FILE: str(studio_ca.ca)}):
            s = vg_settings.load(str(tmp_path / "no-file" if env else tmp_path), env)
            res = vg_client.request_variations(url, ALICE, png, n=1, size="256x256",
                                               timeout=5, ca_file=s.ca_file)
            assert res.images == [png]
    assert [s.headers["authorization"] for s in seen] == [f"Bearer {ALICE}"] * 3


def test_a_ca_file_that_cannot_be_used_is_a_settings_sentence(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    for path, why in ((tmp_path / "missing.pem", "no such file"), (junk, "no pem")):
        e = sentence_of(vg_client.get_usage, "https://127.0.0.1:9", ALICE, timeout=5,
                        ca_file=str(path))
        assert e.kind == "settings"
        assert str(e).startswith(f"The CA file {path} cannot be used (")
        assert why in str(e).lower()


# ------------------------------------------------------------------ issue 19: 18 (client)


def test_state_store_outage_has_its_own_sentence() -> None:
    """503 state_unavailable (Redis down) is not the image backend being down."""
    body = envelope(503, "The gateway's state store (Redis) is unavailable; retry shortly.",
                    "state_unavailable")
    e = vg_errors.error_sentence(503, body, {"retry-after": "2", "x-request-id": "req_9"},
                                 "http://gw/v1/images/variations")
    assert e.kind == "state" and e.code == "state_unavailable"
    assert str(e).startswith("The gateway cannot reach its shared state store (Redis)")
    assert "image backend" not in str(e)
    assert "Try again in 2 seconds" in str(e) and "req_9" in str(e)


def test_http_errors_are_closed(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTPError holds the open response; left unclosed it leaks the socket
    (ResourceWarning on Python 3.14). Each error answer is closed once."""
    closed: list[int] = []
    original = urllib.error.HTTPError.close

    def close(self: urllib.error.HTTPError) -> None:
        closed.append(self.code)
        original(self)

    monkeypatch.setattr(urllib.error.HTTPError, "close", close)
    sentence_of(vg_client.get_usage, gateway.url, "nope-nope-nope-nope")
    with http_server(lambda h: (302, {"Location": "http://elsewhere/"}, b"")) as (url, _):
        sentence_of(vg_client.get_usage, url, ALICE, timeout=5)
    assert closed[:1] == [401] and closed[-1:] == [302]


@pytest.mark.parametrize("ok", [True, False], ids=["2xx", "error"])
def test_a_huge_declared_answer_is_refused_before_reading(ok: bool) -> None:
    status = b"200 OK" if ok else b"500 Internal Server Error"
    answer = (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000000000\r\n\r\n{\"data\": [")
    with raw_server(answer) as url:
        errors = both_calls(url)
    for e in errors:
        if ok:
            assert e.kind == "protocol"
            assert "is larger than" in str(e) and "GIMP stopped reading it" in str(e)
        else:  # the error body is not read: the status alone speaks
            assert e.status == 500 and "without an error message" in str(e)


def test_an_endless_answer_is_cut_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Content-Length (read until the connection closes): reading stops one byte past
    the cap instead of filling memory."""
    monkeypatch.setattr(vg_client, "MAX_ANSWER", 4096)
    monkeypatch.setattr(vg_http, "MAX_SMALL_ANSWER", 1024)
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b" " * 100_000
    with raw_server(answer) as url:
        errors = both_calls(url)
    assert "larger than 0.00390625 MB" in str(errors[0])
    assert "larger than 0.000976562 MB" in str(errors[1])
    assert all(e.kind == "protocol" for e in errors)


# ------------------------------------------------------------------ issue 19: the dialogs


def test_background_call_returns_at_once_and_delivers_from_its_thread() -> None:
    """Test Connection's work runs off the GTK thread: the call returns while the network
    call still blocks, and the text arrives from the worker thread."""
    release = threading.Event()
    got: queue.Queue[tuple[str, int]] = queue.Queue()

    def slow() -> str:
        assert release.wait(30)
        return "Connected as alice; no image limits apply."

    def deliver(text: str) -> None:
        got.put((text, threading.get_ident()))

    t = vg_client.call_in_background(slow, deliver)
    assert t.daemon and got.empty()
    release.set()
    text, ident = got.get(timeout=30)
    assert text == "Connected as alice; no image limits apply."
    assert ident != threading.get_ident()

    def fails(exc: Exception) -> Callable[[], str]:
        def fn() -> str:
            raise exc
        return fn

    vg_client.call_in_background(fails(vg_client.GatewayError("Nope, sorry.")), deliver)
    assert got.get(timeout=30)[0] == "Nope, sorry."
    vg_client.call_in_background(fails(KeyError("x")), deliver)
    assert got.get(timeout=30)[0] == "Testing the connection failed unexpectedly (KeyError)."


PLUGIN_DIR = HERE.parents[1] / "plugins" / "gimp" / "generate-variations"
SETTINGS_DIALOG = PLUGIN_DIR / "vg_settings_dialog.py"
GENERATE_DIALOG = PLUGIN_DIR / "vg_dialog.py"


def _function(path: Path, name: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def _calls(fn: ast.FunctionDef) -> list[str]:
    """The dotted names of the calls in ``fn``, in source order."""
    out = []
    for node in sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call)),
                       key=lambda n: (n.lineno, n.col_offset)):
        out.append(ast.unparse(node.func))
    return out


def test_settings_dialog_tests_the_connection_off_the_gtk_thread() -> None:
    """GIMP glue (GTK is not importable here; the e2e run drives the real dialog): the
    dialog hands Test Connection to call_in_background, answers through GLib.idle_add and
    makes no blocking gateway call itself."""
    calls = _calls(_function(SETTINGS_DIALOG, "settings_dialog"))
    assert "vg_client.call_in_background" in calls
    assert "GLib.idle_add" in calls
    assert not {"_test_connection", "_usage_summary", "vg_client.get_usage",
                "Gtk.main_iteration"} & set(calls)


def test_generate_dialog_asks_for_combo_boxes_before_fill() -> None:
    """GIMP 3.2 draws a 3-value Choice as radio buttons; a combo box asked for before
    fill() stays one in 3.0 and 3.2 (libgimp/gimpproceduredialog.c)."""
    fn = _function(GENERATE_DIALOG, "generate_dialog")
    src = ast.unparse(fn)
    assert "dialog.get_widget(name, Gtk.ComboBox.__gtype__)" in src
    assert src.index("get_widget") < src.index("dialog.fill(")
    tree = ast.parse(GENERATE_DIALOG.read_text())
    choice_args = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                       and ast.unparse(n.targets[0]) == "CHOICE_ARGS")
    assert set(choice_args) == {"size", "square-mode"}


# The characters a hostile (or broken) server could use to disguise a GIMP dialog: line
# breaks, an ANSI escape, a right-to-left override, a zero-width joiner's kin.
DISGUISE = "\n\r\x1b[2J\u202e\u2066\x00\u200b"


@pytest.mark.parametrize("status", [400, 403, 500, 502, 429])
def test_what_the_gateway_said_is_shown_printable_and_short(status: int) -> None:
    """The envelope's message and param, and the x-request-id, reach the sentence with
    no control or bidi characters and at most 200 characters each, however long (the
    answer cap is a megabyte)."""
    body = json.dumps({"error": {"message": "bad" + DISGUISE + "m" * 900_000,
                                 "type": "invalid_request_error",
                                 "param": "image" + DISGUISE + "p" * 5000,
                                 "code": None}}).encode()
    headers = {"x-request-id": "req_1" + DISGUISE + "r" * 5000,
               "retry-after": "3" + DISGUISE + "9" * 5000}
    e = vg_errors.error_sentence(status, body, headers, "http://gw/v1/images/variations")
    text = str(e)
    assert text.isprintable(), repr(text[:400])
    assert len(text) < 1200, len(text)
    assert "bad" in text
    if status == 400:
        assert "(parameter 'image" in text
    if status in (403, 500, 502):
        assert "req_1" in text
    assert e.request_id is not None and len(e.request_id) <= 203
    assert e.request_id.isprintable()


def test_shown_keeps_printable_text_and_cuts_at_200() -> None:
    assert vg_errors.shown("x" * 200) == "x" * 200
    assert vg_errors.shown("x" * 201) == "x" * 200 + "..."
    assert vg_errors.shown("a\u202eb\nc\x07d é 猫") == "abcd é 猫"


def test_a_request_id_kept_in_records_is_printable() -> None:
    """A successful answer's x-request-id goes into the layer's record: cleaned too."""
    answer = json.dumps({"created": 1, "data": [
        {"b64_json": base64.b64encode(png_bytes(4, 4)).decode()}]}).encode()
    with http_server(lambda h: (200, {"Content-Type": "application/json",
                                      "x-request-id": "req_9\x1b\x85" + "z" * 400},
                                answer)) as (gw, _):
        result = vg_client.request_variations(gw, ALICE, png_bytes(8, 8), n=1,
                                              size="256x256", timeout=5)
    assert result.request_id is not None and result.request_id.isprintable()
    # Cut to the 200 characters the record reader takes (before: 203, "..." included,
    # so More like this refused the plug-in's own record).
    assert result.request_id.startswith("req_9zz") and len(result.request_id) == 200
    rec = vg_steer.records(vg_steer.Steer(seed=1), request_id=result.request_id, n=1,
                           size="256x256", square_mode="pad", scale_to_source=False,
                           source_tattoo=2, source_name="Dusk", selection=None)[1]
    assert vg_steer.read_record(rec.to_json()) == rec
