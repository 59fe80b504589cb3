"""The member rules (gateway.members) over the SQLite store: tokens, limits, CAS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import base_config, sha

from gateway.config import build_config
from gateway.errors import ApiError
from gateway.members import MAX_TOKENS, Member, Members, parse_quota, parse_time, token_sha256
from gateway.members.sqlite import SqliteMembers


@pytest.fixture
async def members(tmp_path: Path) -> Members:
    return Members(SqliteMembers(tmp_path / "state.sqlite3"), clock=lambda: 1_000.0)


async def test_token_rotation_keeps_at_most_two_and_tombstones_the_rest(members: Members
                                                                      ) -> None:
    made = await members.create("carol", {"images_per_day": 5}, None)
    assert made.token and made.member is not None
    first = made.member.tokens[0]
    assert first.sha256 == token_sha256(made.token)  # only the digest is kept
    second = await members.rotate("carol", False, None)
    assert second.member is not None and len(second.member.tokens) == 2
    third = await members.rotate("carol", False, None)  # a third retires the oldest
    assert third.member is not None and len(third.member.tokens) == MAX_TOKENS
    assert first not in third.member.tokens and third.revoked == 1
    snap = await members.store.load()
    assert first.sha256 in snap.revoked
    alone = await members.rotate("carol", True, None)
    assert alone.member is not None and len(alone.member.tokens) == 1
    assert alone.revoked == 2
    assert snap.members["carol"].quota == {"images_per_day": 5}


async def test_config_members_are_seeded_and_answer_409(tmp_path: Path, members: Members
                                                        ) -> None:
    config = build_config(base_config(tmp_path))
    await members.seed(config)
    snap = await members.store.load()
    assert {n: m.source for n, m in snap.members.items()} == {"alice": "config",
                                                              "bob": "config"}
    assert snap.members["alice"].tokens[0].sha256 == sha("vg-test-alice-token")
    for change in (members.rotate("alice", False, None), members.revoke("alice"),
                   members.remove("bob"), members.update("bob", {}, None, False),
                   members.create("alice", {}, None)):
        with pytest.raises(ApiError) as err:
            await change
        assert err.value.status == 409 and "config" in err.value.message
    # A member gone from the config leaves the store (its token is then "revoked").
    raw = base_config(tmp_path)
    del raw["users"]["bob"]
    await members.seed(build_config(raw))
    snap = await members.store.load()
    assert set(snap.members) == {"alice"} and sha("vg-test-bob-token") in snap.revoked


async def test_seeding_the_same_config_again_changes_nothing(tmp_path: Path,
                                                              members: Members) -> None:
    """Every start and reload seeds: an unchanged member must not be rewritten (on Redis
    each write bumps the version and makes every replica reload)."""
    config = build_config(base_config(tmp_path))
    await members.seed(config)
    before = await members.store.load()
    writes = []
    swap = members.store.swap

    async def counted(*args: Any, **kwargs: Any) -> bool:
        writes.append(args[0])
        return await swap(*args, **kwargs)
    members.store.swap = counted  # type: ignore[method-assign]
    members.clock = lambda: 2_000.0  # a later start
    await members.seed(config)
    assert writes == [] and await members.store.load() == before
    raw = base_config(tmp_path)
    raw["users"]["bob"] = {"token_sha256": sha("vg-test-bob-new-token")}
    await members.seed(build_config(raw))
    assert writes == ["bob"]  # a changed token is written


async def test_a_concurrent_change_is_not_lost(members: Members) -> None:
    await members.create("dave", {}, None)
    store = members.store
    current = (await store.load()).members["dave"]
    stale = Member("dave", "api", 0.0)
    assert not await store.swap("dave", stale, None)  # compare-and-set refuses
    assert await store.swap("dave", current, None)


@pytest.mark.parametrize(("raw", "param"), [
    ({"images_per_dya": 1}, "quota.images_per_dya"),
    ({"images_per_day": -1}, "quota.images_per_day"),
    ({"images_per_day": 1.5}, "quota.images_per_day"),
    ({"blocked": True}, "quota.blocked"),
    ({"budget_usd_per_month": float("nan")}, "quota.budget_usd_per_month"),
    ([1], "quota"),
])
def test_quota_validation_names_the_key(raw: object, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_quota(raw)
    assert err.value.status == 400 and err.value.param == param


def test_expiry_parsing() -> None:
    assert parse_time("2030-01-01T00:00:00Z", "expires_at", 0) == 1893456000.0
    assert parse_time("2030-01-01T00:00:00", "expires_at", 0) == 1893456000.0  # UTC
    assert parse_time(1893456000, "expires_at", 0) == 1893456000.0
    for bad in ("tomorrow", "2020-01-01T00:00:00Z", 5, True, [1], 10**400, float("nan")):
        with pytest.raises(ApiError) as err:
            parse_time(bad, "expires_at", 1_700_000_000)
        assert err.value.param == "expires_at"
