"""The admin commands (``users``, ``usage``) never follow a redirect (gateway/cli_http.py):
urllib would send the admin token along, to another host or over plain http."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from support import ADMIN_TOKEN

from gateway.cli import main


class Recorder(http.server.BaseHTTPRequestHandler):
    """Where a redirect points: records each request's Authorization header."""

    seen: list[str | None]

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        body = b'{"data": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Redirector(http.server.BaseHTTPRequestHandler):
    """Answers every request with a redirect to ``target``, as a reverse proxy's
    ``return 301 https://...;`` or a moved gateway does (RFC 9110 section 15.4: the
    client may follow with the same headers)."""

    status: int
    target: str

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def serve(handler: type[http.server.BaseHTTPRequestHandler]
          ) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def elsewhere() -> Iterator[tuple[list[str | None], str]]:
    seen: list[str | None] = []
    server, url = serve(type("Seen", (Recorder,), {"seen": seen}))
    yield seen, url
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("command", [["users", "list"], ["usage", "--month", "2030-01"]])
def test_a_redirect_is_not_followed(status: int, command: list[str],
                                    elsewhere: tuple[list[str | None], str],
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen, target = elsewhere
    server, url = serve(type("Moved", (Redirector,), {"status": status, "target": target}))
    monkeypatch.setenv("VARIATIONS_GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    try:
        code = main([command[0], "--url", url, *command[1:]])
    finally:
        server.shutdown()
        server.server_close()
    out, err = capsys.readouterr()
    assert seen == []  # the token went nowhere but the URL given
    assert code == 1 and f"HTTP {status}, a redirect to {target};" in err
    assert ADMIN_TOKEN not in out + err
