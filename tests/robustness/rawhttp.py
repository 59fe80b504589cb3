"""A raw-socket HTTP/1.1 client for requests no well-behaved library will send.

Bytes go out exactly as given (lying Content-Length, broken framing, trickled bodies);
the answer is read with a hard deadline, so a gateway that hangs fails the test instead
of hanging it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEADLINE_S = 20.0


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool = False  # the server closed the connection after this answer

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Outcome:
    """What came back: a response, or none (closed / reset) — never a hang."""

    response: RawResponse | None
    send_error: str | None = None
    chunks_sent: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def request_bytes(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]],
                  body: bytes = b"", host: str = "gateway") -> bytes:
    items = headers.items() if isinstance(headers, dict) else headers
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in items]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _parse(buf: bytes, head: bool = False) -> tuple[RawResponse | None, int]:
    """A complete response at the start of ``buf`` and its length, else (None, 0)."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None, 0
    lines = buf[:head_end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = 0 if head else int(headers.get("content-length", "0"))
    total = head_end + 4 + length
    if len(buf) < total:
        return None, 0
    return RawResponse(status, headers, buf[head_end + 4 : total]), total


def exchange(url: str, parts: Iterable[bytes | float], deadline_s: float = DEADLINE_S,
             head: bool = False) -> Outcome:
    """Send ``parts`` (bytes, or a float: pause that many seconds) on a fresh connection
    from a sender thread, while this thread reads the first answer until ``deadline_s``.

    Reading concurrently matters: a server that answers early and closes would make a
    blocking ``sendall`` fail before its answer was ever read.
    """
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=5)
    outcome = Outcome(None)
    stop = threading.Event()

    def send() -> None:
        try:
            for part in parts:
                if stop.is_set():
                    return
                if isinstance(part, float):
                    stop.wait(part)
                    continue
                sock.sendall(part)
                outcome.chunks_sent += 1
        except OSError as exc:
            outcome.send_error = type(exc).__name__

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    buf = b""
    end = time.monotonic() + deadline_s
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no answer and no close within {deadline_s}s "
                                     f"(got {len(buf)} bytes)")
            sock.settimeout(min(left, 1.0))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:  # closed (or reset): whatever was complete is the answer
                resp, _ = _parse(buf, head)
                if resp is not None:
                    resp.closed = True
                outcome.response = resp
                return outcome
            buf += data
            resp, _ = _parse(buf, head)
            if resp is not None:
                resp.closed = resp.headers.get("connection", "").lower() == "close"
                outcome.response = resp
                return outcome
    finally:
        stop.set()
        sock.close()
        sender.join(5)
