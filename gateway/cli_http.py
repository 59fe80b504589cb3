"""The admin commands' HTTP (``users``, ``usage``): urllib, with redirects refused.

urllib follows 301, 302, 303, 307 and 308 and sends the request's headers again,
``Authorization`` included, even to another host or from https to plain http. A redirect
(a proxy upgrading to https, a moved gateway, a hostile answer) would so hand the admin
token to wherever it points. The commands send it only to the URL they were given, and
say where the redirect led so the user can pass that URL themselves.
"""

from __future__ import annotations

import http.client
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
