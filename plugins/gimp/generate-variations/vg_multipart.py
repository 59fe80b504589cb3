"""The ``multipart/form-data`` body of Generate Variations' upload, built by hand (GIMP's
bundled Python has no third-party HTTP library)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping


def build_multipart(
    fields: Mapping[str, str],
    files: list[tuple[str, str, str, bytes]],
    boundary: str | None = None,
) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body: text ``fields`` then ``files`` given as
    ``(field name, file name, content type, bytes)``. Returns ``(body, content type)``."""
    b = boundary or ("----generate-variations-" + uuid.uuid4().hex)
    out: list[bytes] = []

    def quote(s: str) -> str:
        return s.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "")

    for name, value in fields.items():
        out.append(f"--{b}\r\n".encode())
        out.append(f'Content-Disposition: form-data; name="{quote(name)}"\r\n\r\n'.encode())
        out.append(str(value).encode("utf-8"))
        out.append(b"\r\n")
    for name, filename, ctype, data in files:
        out.append(f"--{b}\r\n".encode())
        out.append(
            f'Content-Disposition: form-data; name="{quote(name)}"; '
            f'filename="{quote(filename)}"\r\n'.encode()
        )
        out.append(f"Content-Type: {ctype}\r\n\r\n".encode())
        out.append(data)
        out.append(b"\r\n")
    out.append(f"--{b}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={b}"

