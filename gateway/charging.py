"""What one variations request costs its member: held, charged, or given back.

A request holds quota at the dearest backend it may reach before the backend is called,
and is charged at the price of the backend that delivered. :class:`Charge` is that life
in one ``async with`` block, built over the quota store's public ``reserve``,
``commit``, ``refund`` and ``refund_soon``:

- nothing generated (a cache hit): nothing held, nothing charged;
- the block fails, or its client leaves, before a backend delivered: the hold is
  refunded when the block exits;
- a backend delivered: the images are charged (:class:`DeliveredCharge`), by the cache,
  in a task of its own, whether or not the client is still there, and only then
  pooled; so no image is ever served without having been charged once. A commit that
  fails gives the hold back.

After the block, :attr:`Charge.images` and :attr:`Charge.cost` say what the ledger holds
(or will, once a commit under way lands), which is what the audit records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import TracebackType

import structlog

from gateway.auth import Principal
from gateway.errors import ApiError
from gateway.quota import QuotaStore, Reservation
from gateway.writes import WriteHealth

log = structlog.get_logger("gateway.request")


class DeliveredCharge:
    """The ledger commit of images a backend delivered (:class:`gateway.cache.Charge`).

    The cache begins it between writing the images' files and indexing them, in a task
    that outlives the request: so images are charged to the request that generated
    them, connected or not, and then pooled. A commit that fails, or images whose store
    failed before the charge began, give the reservation back.
    """

    def __init__(self, quota: QuotaStore, reservation: Reservation, images: int,
                 cost: float) -> None:
        self._quota, self._reservation = quota, reservation
        self.images, self.cost = images, cost
        self._commit: asyncio.Future[None] | None = None
        self._dropped = False

    def begin(self) -> asyncio.Future[None]:
        if self._commit is None:
            if self._dropped:
                raise RuntimeError("a dropped charge cannot begin")
            self._commit = asyncio.ensure_future(
                self._quota.commit(self._reservation, self.images, self.cost))
            self._commit.add_done_callback(self._refund_if_failed)
        return self._commit

    def drop(self) -> None:
        if self._commit is None and not self._dropped:
            self._dropped = True
            self._quota.refund_soon(self._reservation)

    def failed(self) -> bool:
        """Whether the images are known not to be charged (dropped, or a failed commit);
        a charge still under way, or not yet begun by the cache, is not."""
        commit = self._commit
        if commit is None:
            return self._dropped
        return commit.done() and (commit.cancelled() or commit.exception() is not None)

    def _refund_if_failed(self, commit: asyncio.Future[None]) -> None:
        """A failed commit gives the hold back: nobody else would, once the client left."""
        if commit.cancelled() or commit.exception() is not None:
            self._quota.refund_soon(self._reservation)


class Charge:
    """One request's charge, as an async context manager (see the module docstring).

    ``price`` is the price of one image at the dearest backend the request may reach:
    what :meth:`reserve` holds per image. A request generates at most once.
    """

    def __init__(self, quota: QuotaStore, principal: Principal, price: float,
                 size_label: str) -> None:
        self._quota, self._principal = quota, principal
        self._price, self._size = price, size_label
        self._reservation: Reservation | None = None
        self._delivered: DeliveredCharge | None = None

    async def __aenter__(self) -> Charge:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """On a failure or a disconnect before delivery: give the hold back. Once
        delivered, the cache settles the charge (a failed commit refunds itself)."""
        if kind is not None and self._reservation is not None and self._delivered is None:
            await self._quota.refund(self._reservation)

    async def reserve(self, images: int) -> None:
        """Hold ``images`` at the ceiling price (``QuotaRejected`` past a limit)."""
        if self._reservation is not None:
            raise RuntimeError("a request reserves once")
        self._reservation = await self._quota.reserve(
            self._principal, images, self._price * images, self._size)

    def delivered(self, images: int, cost: float) -> DeliveredCharge:
        """A backend delivered ``images`` costing ``cost`` USD: the commit the cache
        begins before it pools them."""
        if self._reservation is None:
            raise RuntimeError("delivered before anything was reserved")
        self._delivered = DeliveredCharge(self._quota, self._reservation, images,
                                          round(cost, 6))
        return self._delivered

    @property
    def images(self) -> int:
        """Images charged (or being charged) to the member; 0 if none or refunded."""
        charged = self._delivered
        return 0 if charged is None or charged.failed() else charged.images

    @property
    def cost(self) -> float:
        """USD charged (or being charged); 0.0 if nothing or refunded."""
        charged = self._delivered
        return 0.0 if charged is None or charged.failed() else charged.cost


def records_unavailable() -> ApiError:
    """A success the gateway could not record (its ledger or audit write failed)."""
    return ApiError(503, "The gateway cannot write its records right now (disk full, "
                    "read-only or locked), so it does not answer; images already generated "
                    "for this request were kept and charged once. Tell the gateway's admin: "
                    "the request id names the cause in the gateway's logs.",
                    code="storage_unavailable", should_retry=False)


async def counted(write: Awaitable[None], writes: WriteHealth, request_id: str) -> None:
    """Wait for a request's ledger row (begun with ``count_request``) before answering.

    The audit says what the client got: a success whose count cannot be written is a
    503 (:func:`records_unavailable`), like a charge that cannot be (a cache hit is no
    exception). The wait is shielded: the row is written even if the client leaves. The
    outcome feeds ``/readyz`` (``writes``), which recovers with the next good write.
    """
    (outcome,) = await asyncio.shield(asyncio.gather(write, return_exceptions=True))
    failed = outcome if isinstance(outcome, BaseException) else None
    writes.report("state", failed)
    if failed is not None:
        log.error("ledger_write_failed", request_id=request_id,
                  error=type(failed).__name__, detail=str(failed))
        # A store that raised its own 503 (Redis away: state_unavailable, retry after)
        # says so; anything else is a disk or database that cannot write.
        raise failed if isinstance(failed, ApiError) else records_unavailable()
