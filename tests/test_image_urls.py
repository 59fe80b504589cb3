"""Served image URLs end to end: lifetime, tampering, the sweeper, public_base_url."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from support import auth, png_bytes

from gateway.keys import IMAGES


async def _variation_url(client, **fields: str) -> str:
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(64), filename="a.png")
    form.add_field("size", "256x256")
    for k, v in fields.items():
        form.add_field(k, v)
    resp = await client.post("/v1/images/variations", data=form, headers=auth())
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"][0]["url"]


async def test_url_stops_working_after_its_lifetime(gateway_client) -> None:
    """A URL answers until its ``expires`` second and is refused after it. The image
    store's clock is injected and held still: on the wall clock, ``int(now + ttl)``
    leaves a one-second URL between 0 and 1 s of life, so the first download could
    already find it expired."""
    client = await gateway_client(images={"url_ttl_seconds": 1})
    now = [time.time()]
    client.app[IMAGES].clock = lambda: now[0]
    url = await _variation_url(client)
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    expires = int(url.split("expires=")[1].split("&")[0])
    assert expires == int(now[0] + 1)  # minted on the store's clock
    assert (await client.get(path)).status == 200
    now[0] = expires  # its last valid moment
    assert (await client.get(path)).status == 200
    now[0] = expires + 0.001
    resp = await client.get(path)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "url_expired"


async def test_one_character_changes_are_refused(gateway_client) -> None:
    client = await gateway_client()
    url = await _variation_url(client)
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    assert (await client.get(path)).status == 200
    prefix, _, rest = path.partition("/v1/images/files/")
    image_id, _, query = rest.partition(".png?")
    sig_at = query.index("signature=") + len("signature=")
    tampered_sig = query[:sig_at] + ("A" if query[sig_at] != "A" else "B") + query[sig_at + 1:]
    tampered_id = ("1" if image_id[0] != "1" else "2") + image_id[1:]
    for bad in (f"/v1/images/files/{image_id}.png?{tampered_sig}",
                f"/v1/images/files/{tampered_id}.png?{query}"):
        resp = await client.get(bad)
        assert resp.status == 403, bad
        body = await resp.json()
        assert body["error"]["code"] == "invalid_signature"
    del prefix
    resp = await client.get("/v1/images/files/../../state.sqlite3.png?expires=1&signature=x")
    assert resp.status in (403, 404)
    # A signature no HMAC could be (non-ASCII) is refused the same way, not a 500.
    non_ascii = query[:sig_at] + "%C3%A9"
    resp = await client.get(f"/v1/images/files/{image_id}.png?{non_ascii}")
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "invalid_signature"


async def test_a_malformed_range_is_ignored(gateway_client) -> None:
    client = await gateway_client()
    url = await _variation_url(client)
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    whole = await (await client.get(path)).read()
    for bad in ("bytes=50-10", "bytes=0-1,5-6", "bytes=abc"):
        resp = await client.get(path, headers={"Range": bad})
        assert resp.status == 200, bad
        assert resp.headers["Content-Type"] == "image/png"
        assert await resp.read() == whole
    resp = await client.get(path, headers={"Range": "bytes=0-9"})
    assert resp.status == 206 and await resp.read() == whole[:10]


async def test_public_base_url_is_used(gateway_client) -> None:
    client = await gateway_client(server={"public_base_url": "https://vg.example.com/"})
    url = await _variation_url(client)
    assert url.startswith("https://vg.example.com/v1/images/files/")


def test_urls_from_a_real_process_download(gateway_process) -> None:
    g = gateway_process()
    import openai

    client = openai.OpenAI(base_url=g.url + "/v1", api_key="vg-test-alice-token",
                           max_retries=0)
    resp = client.images.create_variation(image=("a.png", png_bytes(64)), size="256x256")
    with urllib.request.urlopen(resp.data[0].url) as r:
        assert r.status == 200 and r.read().startswith(b"\x89PNG")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(resp.data[0].url.replace("signature=", "signature=x"))
    assert info.value.code == 403


async def _post(client, host: str, image: bytes) -> aiohttp.ClientResponse:  # type: ignore[no-untyped-def]
    form = aiohttp.FormData()
    form.add_field("image", image, filename="a.png")
    form.add_field("size", "256x256")
    return await client.post("/v1/images/variations", data=form,
                             headers={**auth(), "Host": host})


async def test_a_host_outside_allowed_hosts_gets_an_error_not_a_url(gateway_client) -> None:
    """Issue 19, item 10: ``Host: evil.example:666`` minted links to evil.example."""
    client = await gateway_client(server={"allowed_hosts": ["VG.lan:8080", "vg.lan"]})
    for evil in ("evil.example:666", "vg.lan:666", "vg.lan.evil.example"):
        resp = await _post(client, evil, png_bytes(64))
        assert resp.status == 400, evil
        error = (await resp.json())["error"]
        assert (error["code"], error["param"]) == ("invalid_host", None)
        assert "/v1/images/files/" not in await resp.text()
    usage = await (await client.get("/v1/usage", headers=auth())).json()
    assert usage["limits"]["images_per_day"]["used"] == 0  # refused before anything ran
    for good in ("vg.lan:8080", "VG.LAN"):
        resp = await _post(client, good, png_bytes(64))
        assert resp.status == 200, await resp.text()
        url = (await resp.json())["data"][0]["url"]
        assert url.lower().startswith(f"http://{good.lower()}/v1/images/files/")


async def test_the_url_memo_never_hands_a_link_to_another_host(gateway_client) -> None:
    """A hit's URL is memoised: a link minted for one Host is never the answer to a
    request that came in under another (here on loopback, where any Host is taken)."""
    client = await gateway_client()
    image = png_bytes(64, seed=11)
    for _ in range(3):  # a miss, then hits: the memo holds the link for this host
        resp = await _post(client, "evil.example:666", image)
        assert resp.status == 200
    resp = await _post(client, "127.0.0.1:8080", image)
    assert resp.headers["X-Cache"] == "HIT"
    assert (await resp.json())["data"][0]["url"].startswith("http://127.0.0.1:8080/")


async def test_public_base_url_wins_over_the_host_header(gateway_client) -> None:
    client = await gateway_client(server={"public_base_url": "https://vg.example.com"})
    resp = await _post(client, "evil.example:666", png_bytes(64, seed=12))
    assert (await resp.json())["data"][0]["url"].startswith("https://vg.example.com/")
