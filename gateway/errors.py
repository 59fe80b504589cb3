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

from gateway.sqlite import unavailable

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


def _local_os_error(exc: BaseException, errnos: set[int]) -> bool:
    return (isinstance(exc, OSError) and exc.errno in errnos
            and not isinstance(exc, aiohttp.ClientError))


def storage_failing(exc: BaseException) -> bool:
    """A store that is full, failing or away: a disk (ENOSPC, EROFS, EIO), a SQLite file
    (locked, full) or the Redis state store. A cache can answer without storing."""
    return (unavailable(exc) or _local_os_error(exc, _STORAGE_ERRNOS)
            or (isinstance(exc, ApiError) and exc.code == "state_unavailable"))


def storage_unavailable(exc: BaseException) -> ApiError | None:
    """A 503 for a disk or database the gateway cannot write, else None.

    Not retried (``x-should-retry: false``): a full disk stays full, and each SDK retry
    of a miss would pay the backend again for images that cannot be delivered.
    """
    if not (unavailable(exc) or _local_os_error(exc, _STORAGE_ERRNOS | _PERMISSION_ERRNOS)):
        return None
    return ApiError(503, "The gateway cannot write to its storage right now (disk full, "
                    "read-only or locked); nothing was charged. Tell the gateway's admin: "
                    "the request id names the cause in the gateway's logs.",
                    code="storage_unavailable", should_retry=False)
