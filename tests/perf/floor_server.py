"""The least an aiohttp process can do per cache hit: a baseline for ``make bench``.

``python floor_server.py PORT BODY_FILE [sha256]`` answers ``POST`` with the bytes of
``BODY_FILE`` after reading the whole upload (and hashing it with ``sha256``), and
``GET /healthz`` with 200. No parsing, no auth, no state: what is left of the gateway's
cost per hit once everything it must do is removed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from aiohttp import web


def main() -> None:
    port, body, hashing = int(sys.argv[1]), Path(sys.argv[2]).read_bytes(), "sha256" in sys.argv

    async def answer(request: web.Request) -> web.Response:
        upload = await request.read()
        if hashing:
            hashlib.sha256(upload).hexdigest()
        return web.Response(body=body, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", answer)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
