"""Issue 19 item 1: no image is ever served without having been charged once.

The adaptive disconnect script of the issue, as a test: a member asks for n=10, drops
the connection right after the backend has answered (at a different point of the
charge-and-pool step on each try), then re-sends the same upload. Before the fix the
drop refunded the reservation while the images stayed in the pool, so the re-send was
a HIT charged 0: 90 free images in 45 tries. Now the ledger must hold every image the
backend ever delivered, after all 30 tries.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from instrumented_backend import InstrumentedBackend, Start, register, usage, vary
from support import ADMIN_TOKEN, eventually, png_bytes

from gateway.generation import Generation, VariationRequest
from gateway.keys import AUDIT

TRIES = 30
N = 10


@pytest.fixture
def instrumented(monkeypatch: pytest.MonkeyPatch, gateway_client: Any) -> Start:
    return register(monkeypatch, gateway_client)


def count_deliveries(backend: InstrumentedBackend, monkeypatch: pytest.MonkeyPatch
                     ) -> list[int]:
    """The number of images of every call that returned images (a call cancelled
    before answering delivered nothing)."""
    delivered: list[int] = []
    original = backend.generate

    async def generate(request: VariationRequest) -> Generation:
        result = await original(request)
        delivered.append(len(result.images))
        return result

    monkeypatch.setattr(backend, "generate", generate)
    return delivered


async def images_today(client: Any) -> int:
    async with client.get("/admin/usage",
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        assert r.status == 200
        row = (await r.json())["users"].get("alice", {})
    return int(row.get("images_today", 0))


async def test_dropping_after_the_backend_answered_gets_no_free_images(
        instrumented: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    client, backend = await instrumented(quota_defaults={"images_per_day": None})
    delivered = count_deliveries(backend, monkeypatch)
    statuses: list[str] = []
    for i in range(TRIES):
        image = png_bytes(seed=5000 + i)
        before = len(delivered)
        task = asyncio.create_task(vary(client, image, n=N))
        # The backend has answered: drop now, or a bit later (polled on every turn).
        await eventually(lambda before=before: len(delivered) > before, "the backend answering",
                         interval_s=0)
        for _ in range(i % 10):  # each try drops at another point after delivery
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        again = await vary(client, image, n=N)  # the same upload, re-sent
        assert again.status == 200, again.body
        assert len(again.body["data"]) == N
        statuses.append(again.headers["X-Cache"])
    # Every image the backend delivered is in the ledger: none was served uncharged.
    total = sum(delivered)
    charged = [0]

    async def all_charged() -> bool:
        charged[0] = await images_today(client)
        return charged[0] == total

    await eventually(all_charged, lambda: f"{total - charged[0]} free images in {TRIES} "
                     f"tries (cache: {statuses})")
    assert (await usage(client))["limits"]["images_per_day"]["used"] == total  # none held
    assert "HIT" in statuses  # the drops left their (paid) images in the pool
    # Each dropped request's audit row says what it was charged.
    dropped = [r for r in client.app[AUDIT].query(member="alice", limit=1000)
               if r["status"] == 499]
    assert len(dropped) == TRIES
    assert sum(r["images_charged"] for r in dropped) + sum(
        N for s in statuses if s == "MISS") == total


async def test_a_drop_before_the_backend_answers_is_refunded(instrumented: Start) -> None:
    """The other half of the rule: what was not delivered is not charged."""
    client, backend = await instrumented(quota_defaults={"images_per_day": None})
    backend.gate.clear()
    task = asyncio.create_task(vary(client, png_bytes(seed=1), n=N))
    await eventually(lambda: backend.in_flight == 1, "the request at the backend")
    task.cancel()
    await eventually(lambda: backend.in_flight == 0, "the backend call cancelled")
    backend.gate.set()
    await asyncio.gather(task, return_exceptions=True)
    assert (await usage(client))["limits"]["images_per_day"]["used"] == 0
