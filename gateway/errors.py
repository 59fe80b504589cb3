"""OpenAI-format errors.

Every failure the gateway reports to a client is an :class:`ApiError`, rendered as the
envelope the official SDKs parse: ``{"error": {"message", "type", "param", "code"}}``.
``should_retry`` becomes the ``x-should-retry`` header, which the SDK obeys before its
own status-based rules, so bad input and exhausted daily quotas are not retried.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "requests",
}


@dataclass(eq=False)
class ApiError(Exception):
    """An error answered to the client in the OpenAI envelope."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    type: str | None = None
    should_retry: bool | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if self.type is None:
            self.type = _TYPES.get(self.status, "server_error" if self.status >= 500 else
                                   "invalid_request_error")
        if self.should_retry is None and 400 <= self.status < 500 and self.status not in (
            408, 409, 429,
        ):
            self.should_retry = False

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        headers = dict(self.headers)
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return web.Response(
            status=self.status,
            body=json.dumps(self.body()).encode(),
            content_type="application/json",
            headers=headers,
        )


def invalid(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    """A 400 for bad input: a retry cannot help."""
    return ApiError(400, message, code=code, param=param)


# What a local file operation fails with when the disk is full, read-only or failing
# (waiting, or freeing space, helps), and when it lacks permission (a setup to fix).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}
# How long a client waits before retrying when the shared state store is away.
STATE_RETRY_AFTER_SECONDS = 2
LOCAL_STORAGE_MESSAGE = (
    "The gateway cannot write to its storage right now (disk full, read-only or locked); "
    "nothing was charged. Tell the gateway's admin: the request id names the cause in "
    "the gateway's logs.")


class StorageUnavailable(ApiError):
    """A store cannot be used right now: raised by the store itself, where the failure
    happens (a SQLite file locked or full, a disk full or read-only, Redis away), so
    nothing above a store needs to know what SQLite result codes or Redis errors mean.

    ``shared`` (Redis, the replicas' state store) answers ``503 state_unavailable`` with
    ``retry-after``: Redis comes back. A local store answers ``503 storage_unavailable``
    unretried: a full disk stays full, and each SDK retry of a miss would pay the backend
    again for images that cannot be delivered. ``transient`` is False for a permission
    error (a configuration to fix, which the cache must not quietly work around).
    ``kind`` names the failure underneath, as ``/readyz`` shows it.
    """

    def __init__(self, cause: BaseException, *, shared: bool = False,
                 transient: bool = True) -> None:
        if shared:
            super().__init__(503, "The gateway's state store (Redis) is unavailable; retry "
                             "shortly.", code="state_unavailable", should_retry=True,
                             headers={"retry-after": str(STATE_RETRY_AFTER_SECONDS)})
        else:
            super().__init__(503, LOCAL_STORAGE_MESSAGE, code="storage_unavailable",
                             should_retry=False)
        self.kind = type(cause).__name__
        self.transient = transient


def disk_unavailable(exc: BaseException) -> StorageUnavailable | None:
    """A local disk that is full, read-only, failing (transient) or refuses permission
    (not transient), as :class:`StorageUnavailable`; None for any other error."""
    if not isinstance(exc, OSError) or isinstance(exc, aiohttp.ClientError):
        return None
    if exc.errno in _STORAGE_ERRNOS:
        return StorageUnavailable(exc)
    if exc.errno in _PERMISSION_ERRNOS:
        return StorageUnavailable(exc, transient=False)
    return None


def storage_unavailable(exc: BaseException) -> ApiError | None:
    """The 503 for a disk failure outside the stores (they raise
    :class:`StorageUnavailable` themselves), else None."""
    return disk_unavailable(exc)
