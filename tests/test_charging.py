"""One request's charge (gateway.charging): held, charged once, or given back; what the
audit is told. The HTTP-level behaviour (a disconnect before delivery refunds, images
delivered are charged and pooled) is in test_variations.py and robustness/."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.auth import Principal
from gateway.charging import Charge
from gateway.config import QuotaLimits
from gateway.quota.sqlite import SqliteQuota

ALICE = Principal("alice", QuotaLimits(), True)
PRICE = 0.018


@pytest.fixture
async def quota(tmp_path: Path) -> AsyncIterator[SqliteQuota]:
    store = SqliteQuota(tmp_path / "quota.sqlite3")
    yield store
    await store.close()


async def held(quota: SqliteQuota) -> int:
    """Images held or charged today (a reservation counts until refunded)."""
    return int({s.name: s.used for s in await quota.usage(ALICE)}["images_per_day"])


async def charged(quota: SqliteQuota) -> float:
    return (await quota.all_usage()).get("alice", {}).get("images_today", 0)


async def test_a_failure_before_delivery_gives_the_hold_back(quota: SqliteQuota) -> None:
    charge = Charge(quota, ALICE, PRICE, "512x512")
    with pytest.raises(RuntimeError):
        async with charge:
            await charge.reserve(2)
            assert await held(quota) == 2
            raise RuntimeError("the backend failed")
    assert await held(quota) == 0 and await charged(quota) == 0
    assert (charge.images, charge.cost) == (0, 0.0)


async def test_a_client_leaving_before_delivery_gives_the_hold_back(quota: SqliteQuota
                                                                    ) -> None:
    charge = Charge(quota, ALICE, PRICE, "512x512")
    reserved = asyncio.Event()

    async def request() -> None:
        async with charge:
            await charge.reserve(3)
            reserved.set()
            await asyncio.Event().wait()  # the backend, forever

    task = asyncio.ensure_future(request())
    await reserved.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await held(quota) == 0 and (charge.images, charge.cost) == (0, 0.0)


async def test_delivered_images_stay_charged_whatever_happens_after(quota: SqliteQuota
                                                                    ) -> None:
    charge = Charge(quota, ALICE, PRICE, "512x512")
    with pytest.raises(RuntimeError):
        async with charge:
            await charge.reserve(2)
            await charge.delivered(2, 0.0360004).begin()  # what the cache does
            raise RuntimeError("rendering the answer failed")
    assert await held(quota) == 2 and await charged(quota) == 2
    assert (charge.images, charge.cost) == (2, 0.036)
    assert (await quota.all_usage())["alice"]["spend_usd_this_month"] == 0.036


async def test_delivered_images_the_cache_could_not_keep_are_refunded(quota: SqliteQuota
                                                                      ) -> None:
    charge = Charge(quota, ALICE, PRICE, "512x512")
    async with charge:
        await charge.reserve(1)
        charge.delivered(1, PRICE).drop()  # their store failed before the charge began
    assert await held(quota) == 0 and (charge.images, charge.cost) == (0, 0.0)


async def test_nothing_generated_is_nothing_charged(quota: SqliteQuota) -> None:
    charge = Charge(quota, ALICE, PRICE, "512x512")
    async with charge:
        pass  # a cache hit
    assert await held(quota) == 0 and (charge.images, charge.cost) == (0, 0.0)
    with pytest.raises(RuntimeError):
        charge.delivered(1, PRICE)  # nothing was held for it
