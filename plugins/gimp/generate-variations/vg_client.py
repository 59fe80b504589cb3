"""The gateway calls of Generate Variations: variations, usage, and the Test Connection
helper the settings dialog runs in a thread.

Standard library only (GIMP bundles its own Python on Windows and macOS). The pieces live
beside it: ``vg_http`` (transport: timeouts, caps, TLS, the token's redirect rules),
``vg_multipart`` (the upload body) and ``vg_errors`` (every failure as one sentence a user
can act on, :class:`GatewayError`, which callers catch as ``vg_client.GatewayError``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import vg_http
from vg_errors import SHOWN_MAX, GatewayError, shown
from vg_multipart import build_multipart

__all__ = ["GatewayError", "VariationsResult", "call_in_background", "debug_dir",
           "describe_usage", "get_usage", "request_variations", "usage_summary"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_UPLOAD = 4 * 1024 * 1024
# Caps on what is read into memory (a wrong URL can point at an endless or huge answer).
# A variations answer holds up to 10 base64 PNGs of 1024x1024 (a few MB each).
MAX_ANSWER = 96 * 1024 * 1024
MAX_DOWNLOAD = 32 * 1024 * 1024  # one image fetched from a url item


@dataclass
class VariationsResult:
    images: list[bytes]
    request_id: str | None = None
    cache: str | None = None
    created: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


def request_variations(
    base_url: str,
    token: str,
    png: bytes,
    *,
    n: int,
    size: str,
    fresh: bool = False,
    timeout: float = 180.0,
    filename: str = "image.png",
    user: str | None = None,
    ca_file: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> VariationsResult:
    """``POST /v1/images/variations`` with ``response_format=b64_json``; returns the PNGs.
    ``ca_file``: a PEM file of the studio's CA, trusted besides the OS trust store.
    ``extra``: the gateway's own fields (model, strength, seed, prompt; vg_steer)."""
    if not png.startswith(PNG_SIGNATURE):
        raise GatewayError("Internal error: the prepared upload is not a PNG.", kind="client")
    if len(png) >= MAX_UPLOAD:
        raise GatewayError(
            f"The prepared image is {len(png) / 1048576:.1f} MB; the gateway takes less than "
            "4 MB. Choose a smaller size.", kind="client")
    url = vg_http.api_base(base_url) + "/images/variations"
    fields = {"n": str(int(n)), "size": size, "response_format": "b64_json"}
    if user:
        fields["user"] = user
    fields.update(extra or {})
    body, ctype = build_multipart(fields, [("image", filename, "image/png", png)])
    headers = {"Content-Type": ctype}
    if fresh:
        headers["Cache-Control"] = "no-cache"
    req = vg_http.request(url, token, data=body, headers=headers, method="POST")
    raw, h = vg_http.call(req, url, timeout, ca_file=ca_file, cap=MAX_ANSWER)
    # Kept in each layer's record: printable, and cut to what the record reader takes.
    rid = shown(h.get("x-request-id") or "")[:SHOWN_MAX] or None
    images, created = _images_of(raw, url, token, timeout, ca_file, rid)
    return VariationsResult(images, rid, h.get("x-cache"), created, h)


def _images_of(
    raw: bytes, url: str, token: str, timeout: float, ca_file: str | None, rid: str | None
) -> tuple[list[bytes], Any]:
    """The PNGs of a variations answer (b64_json items, or url items fetched) and its
    ``created``; anything else raises :class:`GatewayError`."""
    try:
        data = json.loads(raw.decode("utf-8"))
        items = data["data"]
        images = []
        for item in items:
            if item.get("b64_json"):
                images.append(base64.b64decode(item["b64_json"], validate=True))
            elif item.get("url"):
                images.append(_download(item["url"], url, token, timeout, ca_file))
            else:
                raise ValueError("an item has neither b64_json nor url")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError,
            binascii.Error) as e:
        raise GatewayError(
            f"The gateway at {url} sent an answer GIMP cannot read ({e}); is the URL that of "
            f"a variations gateway?", kind="protocol", request_id=rid) from None
    if not images:
        raise GatewayError("The gateway returned no images.", kind="protocol", request_id=rid)
    for img in images:
        if not img.startswith(PNG_SIGNATURE):
            raise GatewayError("The gateway returned an image that is not a PNG.",
                               kind="protocol", request_id=rid)
    return images, data.get("created")


def _download(
    image_url: str, api_url: str, token: str, timeout: float, ca_file: str | None = None
) -> bytes:
    full = urllib.parse.urljoin(api_url, image_url)
    target, api = urllib.parse.urlsplit(full), urllib.parse.urlsplit(api_url)
    if target.scheme not in ("http", "https"):
        raise ValueError("an image url is not an http(s) address")
    # Image URLs are signed: the token goes only to the gateway itself, never to another
    # host a public_base_url (a CDN, say) points at.
    same_origin = (target.scheme, target.netloc) == (api.scheme, api.netloc)
    req = vg_http.request(full, token if same_origin else "", follow_redirects=True)
    raw, _ = vg_http.call(req, full, timeout, ca_file=ca_file, cap=MAX_DOWNLOAD)
    return raw


def get_usage(
    base_url: str, token: str, timeout: float = 10.0, ca_file: str | None = None
) -> dict[str, Any]:
    """``GET /v1/usage``: the user's limits and what is left."""
    data = vg_http.get_json(base_url, "/usage", token, timeout, "a usage answer", ca_file)
    if not isinstance(data, dict):
        raise GatewayError(f"The gateway at {vg_http.api_base(base_url)}/usage sent a usage "
                           "answer GIMP cannot read (not a JSON object).", kind="protocol")
    return data


_LIMIT_WORDS = {
    "images_per_day": ("images", "today"),
    "images_per_month": ("images", "this month"),
    "requests_per_minute": ("requests", "this minute"),
}


def describe_usage(usage: Mapping[str, Any]) -> str:
    """One or two lines for the settings dialog, e.g. ``alice: 197 of 200 images left
    today (resets 2026-11-24T00:00:00Z).``"""
    user = usage.get("user") or "you"
    if usage.get("blocked"):
        return f"Connected as {user}, but the account is blocked: ask the gateway admin."
    parts = []
    limits = usage.get("limits")
    if not isinstance(limits, Mapping):
        limits = {}
    for key, (unit, period) in _LIMIT_WORDS.items():
        lim = limits.get(key)
        if not isinstance(lim, dict) or lim.get("limit") is None:
            continue
        text = f"{lim.get('remaining')} of {lim.get('limit')} {unit} left {period}"
        if lim.get("resets_at"):
            text += f" (resets {lim['resets_at']})"
        parts.append(text)
    if not parts:
        return f"Connected as {user}; no image limits apply."
    return f"Connected as {user}: " + "; ".join(parts) + "."


def usage_summary(
    url: str, token: str, timeout: float, ca_file: str | None = None
) -> str:
    """What Test Connection shows: the quota summary, or raise :class:`GatewayError`. The
    client turns every network and protocol failure into one; anything else still becomes
    a sentence, never a traceback in a dialog."""
    try:
        return describe_usage(
            get_usage(url, token, timeout=min(float(timeout), 15.0), ca_file=ca_file))
    except GatewayError:
        raise
    except Exception as e:
        raise GatewayError(
            f"Testing the connection failed unexpectedly ({type(e).__name__}).") from None


def call_in_background(
    fn: Callable[[], str], deliver: Callable[[str], object]
) -> threading.Thread:
    """Run ``fn`` (a blocking network call) in a daemon thread and hand its text, or the
    sentence of its failure, to ``deliver`` from that thread. Returns at once, so a dialog
    stays responsive while a gateway takes its time; the GTK side passes a ``deliver``
    that goes through ``GLib.idle_add`` (GTK widgets belong to the main thread)."""

    def work() -> None:
        try:
            text = fn()
        except GatewayError as e:
            text = str(e)
        except Exception as e:
            text = f"Testing the connection failed unexpectedly ({type(e).__name__})."
        deliver(text)

    t = threading.Thread(target=work, name="generate-variations-call", daemon=True)
    t.start()
    return t


def debug_dir() -> str | None:
    """``VARIATIONS_GATEWAY_DEBUG_DIR``: when set, the plug-in keeps its uploads there."""
    d = os.environ.get("VARIATIONS_GATEWAY_DEBUG_DIR", "").strip()
    return d or None
