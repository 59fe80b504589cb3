"""Signed image URLs under attack: path traversal and signature/expiry tampering.

Raw sockets, so every path reaches the gateway byte for byte (no client normalises
``..`` or re-encodes ``%2F``). The gateway runs with a known signing key, so the test
can mint the URLs an attacker cannot (expired ones, ones for unknown ids) and prove
each refusal comes from the right check. Nothing may answer 200 except an untouched,
unexpired URL, and every refusal is the OpenAI envelope.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from rawhttp import RawResponse, exchange, request_bytes
from support import TOKENS, GatewayProcess, base_config, png_bytes, start_gateway

from gateway.images.fs import ImageStore

KEY = "robustness-test-signing-key-0123456789"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[GatewayProcess, str, str, str, ImageStore]]:
    """A gateway, one generated image's (id, expires, signature), and a twin store."""
    tmp = tmp_path_factory.mktemp("urls")
    g = start_gateway(base_config(tmp, images={"signing_key": KEY, "dir": str(tmp / "images"),
                                               "url_ttl_seconds": 3600}), tmp)
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + png_bytes(
        32) + (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"size\"\r\n\r\n"
               f"256x256\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(g.url + "/v1/images/variations", data=body, headers={
        "Authorization": f"Bearer {TOKENS['alice']}",
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        url = json.load(r)["data"][0]["url"]
    parts = urlsplit(url)
    image_id = Path(parts.path).name.removesuffix(".png")
    q = parse_qs(parts.query)
    store = ImageStore(tmp / "twin", KEY.encode(), 3600)
    yield g, image_id, q["expires"][0], q["signature"][0], store
    g.stop()


def get(g: GatewayProcess, target: str, extra: list[tuple[str, str]] | None = None,
        method: str = "GET") -> RawResponse:
    outcome = exchange(g.url, [request_bytes(method, target, extra or [])],
                       head=method == "HEAD")
    assert outcome.response is not None, f"connection closed without an answer: {target}"
    return outcome.response


def assert_refused(resp: RawResponse, status: int, code: str) -> None:
    assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.headers["content-type"].startswith("application/json")
    error = json.loads(resp.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert resp.headers["x-request-id"].startswith("req_")


def files(image_id: str, expires: str, signature: str) -> str:
    return f"/v1/images/files/{image_id}.png?expires={expires}&signature={signature}"


def test_untouched_url_serves_the_png(signed) -> None:  # type: ignore[no-untyped-def]
    g, image_id, expires, sig, _ = signed
    resp = get(g, files(image_id, expires, sig))
    assert resp.status == 200 and resp.body.startswith(b"\x89PNG")
    head = get(g, files(image_id, expires, sig), method="HEAD")
    assert head.status == 200


def _flip(s: str, i: int = 5) -> str:
    return s[:i] + ("A" if s[i] != "A" else "B") + s[i + 1 :]


def signature_tamperings(image_id: str, expires: str, sig: str, other_sig: str
                         ) -> list[tuple[str, str, str]]:
    """(name, expires, signature): every one must be refused 403 invalid_signature."""
    raw = base64.urlsafe_b64decode(sig + "=")
    return [
        ("one-char-flipped", expires, _flip(sig)),
        ("truncated", expires, sig[:-1]),
        ("extended", expires, sig + "A"),
        ("empty", expires, ""),
        ("padded", expires, sig + "="),
        ("standard-base64", expires, base64.b64encode(raw).decode().rstrip("=").replace(
            "-", "+").replace("_", "/") if ("-" in sig or "_" in sig) else _flip(sig, 0)),
        ("upper-cased", expires, sig.upper() if sig.upper() != sig else _flip(sig, 1)),
        ("hex-of-mac", expires, raw.hex()),
        ("expiry-extended", str(int(expires) + 86400), sig),
        ("expiry-far-future", "99999999999999999999", sig),
        ("expiry-not-a-number", "soon", sig),
        ("expiry-empty", "", sig),
        ("expiry-5000-digits", "9" * 5000, sig),
        ("another-images-signature", expires, other_sig),
        ("signature-nul", expires, sig + "%00"),
    ]


def test_signature_tampering_is_refused(signed) -> None:  # type: ignore[no-untyped-def]
    g, image_id, expires, sig, store = signed
    other_id = "0" * 64
    other_sig = parse_qs(urlsplit(store.url("", other_id)).query)["signature"][0]
    for name, exp, s in signature_tamperings(image_id, expires, sig, other_sig):
        resp = get(g, files(image_id, exp, quote(s, safe="%")))
        try:
            assert_refused(resp, 403, "invalid_signature")
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    # Missing parameters altogether.
    for target in (f"/v1/images/files/{image_id}.png",
                   f"/v1/images/files/{image_id}.png?signature={sig}",
                   f"/v1/images/files/{image_id}.png?expires={expires}"):
        assert_refused(get(g, target), 403, "invalid_signature")


def test_expired_and_unknown_images(signed) -> None:  # type: ignore[no-untyped-def]
    g, image_id, _, _, store = signed
    # A genuine signature (the same key) whose expiry has passed.
    expired = urlsplit(store.url("", image_id, now=time.time() - 7200))
    assert_refused(get(g, f"{expired.path}?{expired.query}"), 403, "url_expired")
    # Genuinely signed, but no such image was ever stored.
    unknown = urlsplit(store.url("", "ab" * 32))
    assert_refused(get(g, f"{unknown.path}?{unknown.query}"), 404, "not_found")
    # Signed ids that are not lower-case sha256 never touch the filesystem.
    for bad_id in (image_id.upper(), image_id[:-1], image_id + "0", "g" * 64):
        u = urlsplit(store.url("", bad_id))
        assert_refused(get(g, f"{u.path}?{u.query}"), 404, "not_found")


TRAVERSALS = [
    "/v1/images/files/../../state.sqlite3.png",
    "/v1/images/files/..%2F..%2Fstate.sqlite3.png",
    "/v1/images/files/%2e%2e%2f%2e%2e%2fsigning.key.png",
    "/v1/images/files/%252e%252e%252fsigning.key.png",
    "/v1/images/files/..%5C..%5Cstate.sqlite3.png",
    "/v1/images/files/%2Fetc%2Fpasswd.png",
    "/v1/images/files//etc/passwd.png",
    "/v1/images/files/{id}.png/../../../../etc/passwd",
    "/v1/images/files/{id}.png%00.txt",
    "/v1/images/files/{id}%00.png",
    "/v1/images/files/ab/{id}.png",
    "/v1/images/files/./{id}.png",
    "/v1/images/files/{id}.PNG",
    "/v1/images/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
]


@pytest.mark.parametrize("template", TRAVERSALS)
def test_path_traversal_is_refused(signed, template: str) -> None:  # type: ignore[no-untyped-def]
    g, image_id, expires, sig, store = signed
    path = template.replace("{id}", image_id)
    # With the real image's signature, and with one minted over the hostile id itself.
    raw_id = path.removeprefix("/v1/images/files/").removesuffix(".png")
    minted = parse_qs(urlsplit(store.url("", raw_id)).query)
    for exp, s in ((expires, sig), (minted["expires"][0], minted["signature"][0])):
        resp = get(g, f"{path}?expires={exp}&signature={s}")
        assert resp.status in (403, 404), (path, resp.status, resp.body[:200])
        assert not resp.body.startswith(b"\x89PNG")
        assert b"root:" not in resp.body and b"SQLite" not in resp.body
        assert_refused(resp, resp.status, json.loads(resp.body)["error"]["code"])


def test_range_requests_stay_in_the_envelope(signed) -> None:  # type: ignore[no-untyped-def]
    g, image_id, expires, sig, _ = signed
    ok = get(g, files(image_id, expires, sig), [("Range", "bytes=0-7")])
    assert ok.status == 206 and ok.body == b"\x89PNG\r\n\x1a\n"
    bad = get(g, files(image_id, expires, sig), [("Range", "bytes=99999999-")])
    # Regression: aiohttp's FileResponse used to answer this itself, with an empty body
    # outside the envelope; the handler now refuses it first.
    assert_refused(bad, 416, "range_not_satisfiable")
    # Issue 19: the last zero bytes is no range at all (was a 206 with the whole file).
    for zero in ("bytes=-0", "bytes=-000", "BYTES=-0"):
        assert_refused(get(g, files(image_id, expires, sig), [("Range", zero)]), 416,
                       "range_not_satisfiable")
    # Tampering still wins over a range: the signature is checked first.
    assert_refused(get(g, files(image_id, expires, _flip(sig)), [("Range", "bytes=0-7")]),
                   403, "invalid_signature")


def test_gateway_log_is_clean(signed) -> None:  # type: ignore[no-untyped-def]
    g = signed[0]
    log = g.log()
    assert "Traceback" not in log and '"status": 5' not in log
