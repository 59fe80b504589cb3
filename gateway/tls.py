"""TLS served by the gateway itself (``server.tls_cert`` / ``server.tls_key``).

An edge box without a reverse proxy would otherwise carry member tokens in the clear.
The files are read once, when the config is loaded and again when ``serve`` builds its
context, so a renewed certificate takes effect on the next restart.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSFileError(ValueError):
    """A certificate or key that cannot be served; ``setting`` names the config key."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


def _no_password() -> bytes:
    """Answer OpenSSL's password callback with nothing.

    Without a callback an encrypted key makes OpenSSL prompt on the terminal, which
    hangs a service; with it the load fails and the error says why.
    """
    return b""


def _read_pem(path: str, setting: str, marker: str, what: str) -> bytes:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise TLSFileError(f"cannot read {path}: {exc.strerror or exc}", setting) from None
    if b"-----BEGIN " not in text or marker.encode() not in text:
        raise TLSFileError(f"{path} is not a PEM {what} (no '-----BEGIN ...{marker}' "
                           "line)", setting)
    return text


def _encrypted(key: str) -> TLSFileError:
    return TLSFileError(f"the key {key} is protected by a passphrase; the gateway needs an "
                        "unencrypted key file readable only by its user (openssl pkey -in "
                        "KEY -out PLAIN.key)", "server.tls_key")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM, leaf first, then intermediates) and ``key``.

    Each failure names the setting to fix: an unreadable or non-PEM file, a key that
    does not belong to the certificate, or a key protected by a passphrase.
    """
    _read_pem(cert, "server.tls_cert", "CERTIFICATE", "certificate")
    key_pem = _read_pem(key, "server.tls_key", "PRIVATE KEY", "private key")
    # PKCS#8 and traditional (Proc-Type) encrypted keys; OpenSSL's own error says no more
    # than "PEM lib".
    if b"ENCRYPTED PRIVATE KEY" in key_pem or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise _encrypted(key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        if "MISMATCH" in reason:
            raise TLSFileError(f"the key {key} does not belong to the certificate {cert}",
                               "server.tls_key") from None
        if "DECRYPT" in reason or "PASSWORD" in reason:
            raise _encrypted(key) from None
        raise TLSFileError(f"cannot use {cert} with {key}: {exc.reason or exc}",
                           "server.tls_cert") from None
    return ctx
