"""One factory for the stateful parts, so ``build_app`` does not care where state lives.

``state.kind: sqlite`` is one edge box: quota ledger, members and cache index in
SQLite, bytes and the signing key on local disk, abuse windows in memory.
``state.kind: redis`` is N replicas: quotas, members (changes announced by pub/sub),
the cache index, the single-flight lock, the signing key and the abuse windows in
Redis; image and cache bytes in a shared directory (``images.store: fs``) or in Redis
itself (``images.store: redis``).
redis-py is imported only in Redis mode, so an edge box does not need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gateway.abuse import Abuse
from gateway.abuse.memory import AbuseMonitor
from gateway.audit import AuditTrail
from gateway.audit.sqlite import AuditLog
from gateway.cache import CacheIndex, ResultCache
from gateway.cache.sqlite import SqliteCacheIndex
from gateway.config import Config
from gateway.images import Blobs, Images, load_signing_key
from gateway.images.blobs import BlobStore
from gateway.images.fs import ImageStore
from gateway.members import MemberStore
from gateway.members.sqlite import SqliteMembers
from gateway.quota import QuotaStore
from gateway.quota.sqlite import SqliteQuota


@dataclass(frozen=True)
class State:
    quota: QuotaStore
    cache: ResultCache
    images: Images
    signing_key: bytes
    abuse: Abuse
    members: MemberStore


def sqlite_files(config: Config) -> list[Path]:
    """The SQLite files this config opens: state and cache index (SQLite state), audit."""
    files = [Path(config.state.path), cache_index_path(config)
             ] if config.state.kind == "sqlite" else []
    return [*files, Path(config.audit.path)]


def written_dirs(config: Config) -> list[Path]:
    """The directories this config writes in (SQLite files, cache and image bytes)."""
    dirs = [f.parent for f in sqlite_files(config)]
    if config.cache.enabled:
        dirs.append(Path(config.cache.dir))
    if config.images.store == "fs":
        dirs.append(Path(config.images.dir))
    return list(dict.fromkeys(d.absolute() for d in dirs))


def unwritable_dir(config: Config) -> Path | None:
    """The first directory this process could not write in (or create), else ``None``.

    Checked before serving: a root-owned directory mounted on the container's state
    volume failed deep in start-up with ``Permission denied: 'var'`` (or SQLite's
    "unable to open database file"), naming neither the directory nor the fix.
    """
    for d in written_dirs(config):
        probe = d
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent  # it will be created in the nearest existing one
        if not os.access(probe, os.W_OK | os.X_OK):
            return probe
    return None


def cache_index_path(config: Config) -> Path:
    return Path(config.cache.dir) / "index.sqlite3"


def generation_deadline(config: Config) -> float:
    """The longest one generation can take (every routed backend queued, retried and
    timed out in turn), plus a margin: how long reservations, in-flight slots and
    flight locks may be held before they count as abandoned by a dead replica."""
    total = 0.0
    for b in config.backends:
        if b.name in config.route:
            attempts = max(1, b.retry.max_attempts)
            total += (b.queue_timeout_seconds + attempts * (b.timeout_seconds
                      + b.connect_timeout_seconds) + attempts * b.retry.backoff_max_seconds)
    return total + 60.0


def build_audit(config: Config) -> AuditTrail:
    """The audit trail; asyncpg is imported only with ``audit.kind: postgres``."""
    a = config.audit
    local = AuditLog(a.path, a.retention_days, stdout=a.stdout)
    if a.kind != "postgres":
        return local
    from gateway.audit.postgres import PostgresAudit, PostgresStore

    return PostgresAudit(local, PostgresStore(a.dsn or ""), a.retention_days)


def build_state(config: Config) -> State:
    if config.state.kind == "redis":
        return _redis_state(config)
    signing_key = load_signing_key(config.images.signing_key, Path(config.state.path).parent)
    quota = SqliteQuota(config.state.path)  # first: it claims the state file
    return State(
        quota=quota,
        cache=_cache(config, SqliteCacheIndex(cache_index_path(config)),
                     BlobStore(Path(config.cache.dir) / "blobs")),
        images=ImageStore(Path(config.images.dir), signing_key,
                          config.images.url_ttl_seconds),
        signing_key=signing_key,
        abuse=AbuseMonitor(config.abuse),
        members=SqliteMembers(config.state.path))


def _cache(config: Config, index: CacheIndex, blobs: Blobs, **extra: float) -> ResultCache:
    return ResultCache(index, blobs, enabled=config.cache.enabled,
                       max_bytes=config.cache.max_bytes,
                       ttl_seconds=config.cache.ttl_seconds, **extra)


def _redis_state(config: Config) -> State:
    from gateway.abuse.redis import RedisAbuseMonitor
    from gateway.cache.redis import RedisCacheIndex
    from gateway.images.redis import RedisBlobStore, RedisImageStore, shared_signing_key
    from gateway.members.redis import RedisMembers
    from gateway.quota.redis import RedisQuota
    from gateway.redis.client import connect, connect_sync

    url, timeout = config.state.redis_url or "", config.state.timeout_seconds
    deadline = generation_deadline(config)
    sync = connect_sync(url, timeout)
    signing_key = shared_signing_key(sync, config.images.signing_key)
    cache_dir, images_dir = Path(config.cache.dir), Path(config.images.dir)
    images: Images
    blobs: Blobs
    if config.images.store == "redis":
        blobs = RedisBlobStore(sync, cache_dir / "spool")
        images = RedisImageStore(sync, images_dir, signing_key,
                                 config.images.url_ttl_seconds, config.images.max_bytes)
    else:  # a directory every replica mounts
        blobs = BlobStore(cache_dir / "blobs")
        images = ImageStore(images_dir, signing_key, config.images.url_ttl_seconds)
    return State(
        quota=RedisQuota(connect(url, timeout), timeout, lease_seconds=deadline),
        cache=_cache(config, RedisCacheIndex(connect(url, timeout), timeout), blobs,
                     flight_ttl_seconds=deadline),
        images=images,
        signing_key=signing_key,
        abuse=RedisAbuseMonitor(connect(url, timeout), timeout, config.abuse),
        members=RedisMembers(connect(url, timeout), timeout))
