"""The admin commands' HTTP (``users``, ``usage``): urllib, with redirects refused.

urllib follows 301, 302, 303, 307 and 308 and sends the request's headers again,
``Authorization`` included, even to another host or from https to plain http. A redirect
(a proxy upgrading to https, a moved gateway, a hostile answer) would so hand the admin
token to wherever it points. The commands send it only to the URL they were given, and
say where the redirect led so the user can pass that URL themselves.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from typing import IO


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, without any user or password in it."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class RedirectRefused(Exception):
    """The gateway answered a redirect, which was not followed."""

    def __init__(self, status: int, location: str) -> None:
        super().__init__(
            f"the gateway answered HTTP {status}, a redirect to {origin(location)}; not "
            "followed, so the admin token goes only to the URL given (check --url)")
        self.status = status
        self.location = location


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                         msg: str, headers: Message, newurl: str) -> None:
        fp.close()
        raise RedirectRefused(code, newurl)


def open_url(request: urllib.request.Request, timeout: float) -> http.client.HTTPResponse:
    """``urllib.request.urlopen`` that raises :class:`RedirectRefused` on a redirect.
    Other errors are urlopen's: ``HTTPError`` for an error status, ``OSError``."""
    opener = urllib.request.build_opener(_RefuseRedirects())
    response: http.client.HTTPResponse = opener.open(request, timeout=timeout)
    return response


ADMIN_TOKEN_ENV = "VARIATIONS_GATEWAY_ADMIN_TOKEN"
URL_ENV = "VARIATIONS_GATEWAY_URL"
DEFAULT_URL = "http://127.0.0.1:8080"
URL_HELP = f"gateway URL (default: ${URL_ENV} or {DEFAULT_URL})"


class AdminError(Exception):
    """An answer other than success, or no answer; the message says which (and names the
    gateway by its origin only: no user or password from the URL)."""


class MissingToken(AdminError):
    """``$VARIATIONS_GATEWAY_ADMIN_TOKEN`` is not set: nothing was sent."""


def admin_call(url: str | None, method: str, path: str, body: object = None,
               timeout: float = 30) -> bytes:
    """One admin API call with the token from ``$VARIATIONS_GATEWAY_ADMIN_TOKEN``; the
    answer's body, or :class:`AdminError` with the gateway's own message."""
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise MissingToken(f"set {ADMIN_TOKEN_ENV} to the gateway's admin token")
    base = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with open_url(req, timeout=timeout) as r:
            answer: bytes = r.read()
            return answer
    except RedirectRefused as exc:
        raise AdminError(str(exc)) from None
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())["error"]
            param = f" (param: {err['param']})" if err.get("param") else ""
            raise AdminError(f"HTTP {exc.code} [{err.get('code')}]: {err['message']}{param}"
                             ) from None
        except (ValueError, KeyError, TypeError):
            raise AdminError(f"HTTP {exc.code} from {origin(base)}") from None
    except OSError as exc:
        raise AdminError(f"cannot reach {origin(base)}: {exc}") from None
