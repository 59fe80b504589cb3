"""The ``variations-gateway`` command: serve, check-config, add-user, users, vary,
install-gimp-plugin."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import signal
import socket
import sqlite3
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import __version__, cli_usage, cli_users
from gateway.config import (
    RESERVED_USER_NAMES,
    USER_NAME,
    Config,
    ConfigError,
    dump_config,
    exposure_problem,
    load_config,
    read_config,
)
from gateway.tls import TLSFileError, server_context


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def check_bind(config: Config, host: str) -> None:
    """``auth.mode: none`` is for loopback only: refuse to expose an open gateway."""
    if config.auth.mode == "none" and not _is_loopback(host):
        raise ConfigError(
            f"auth.mode is none, which is only allowed on a loopback address, but the server "
            f"would listen on {host}. Add users with tokens (variations-gateway add-user NAME)"
            " and set auth.mode: tokens, or bind to 127.0.0.1.", "auth.mode")
    # Again with the host actually bound (--host, names resolved): the config's own
    # host was checked when it loaded.
    problem = exposure_problem(config, host, _is_loopback(host))
    if problem is not None:
        raise ConfigError(problem[1], problem[0])


def plain_http_warning(config: Config, host: str) -> str | None:
    """The warning for a gateway reachable beyond loopback over plain http, else None.

    Member tokens and images would cross the network in the clear. Not given when the
    gateway serves TLS itself, or when ``server.trusted_proxies`` says a proxy sits in
    front (the proxy is then where TLS ends, as in deploy/compose.yaml and Kubernetes).
    """
    if config.server.tls or config.server.trusted_proxies or _is_loopback(host):
        return None
    return (f"listening on {host} over plain http: member tokens and images cross the "
            "network in the clear. Set server.tls_cert and server.tls_key (PEM files) to "
            "serve https, or put a reverse proxy with TLS in front (deploy/nginx.conf) "
            "and list it in server.trusted_proxies.")


def config_warnings(config: Config) -> list[str]:
    """What is valid but almost surely not meant; ``serve`` and ``check-config`` print it."""
    warnings = []
    if config.auth.mode == "tokens" and not config.users:
        warnings.append(
            "WARNING: auth.mode is tokens but no member is configured under users:, so "
            "every API request will be refused with 401 until members are added. Make one "
            "with `variations-gateway add-user NAME` and paste its snippet under users:, or "
            "add members live with `variations-gateway users add NAME`.")
    return warnings


def storage_lines(config: Config) -> list[str]:
    """Where state, cache, images and audit live (absolute: a relative path is the
    config file's, which is not always where an admin looks)."""
    def where(path: str) -> str:
        return str(Path(path).absolute())

    state = "redis (state.redis_url)" if config.state.kind == "redis" else where(
        config.state.path)
    images = "redis (images.store)" if config.images.store == "redis" else where(
        config.images.dir)
    cache = where(config.cache.dir) if config.cache.enabled else "off"
    return [f"  state: {state}", f"  cache: {cache}", f"  images: {images}",
            f"  audit: {where(config.audit.path)}"]


class PortInUse(Exception):
    """The address to listen on is taken; the message says which setting to change."""


def _port_in_use(host: str, port: int, setting: str, flag: str) -> PortInUse:
    return PortInUse(
        f"port {port} on {host} is already in use (another gateway, or another "
        f"program). Stop it, or pick a free port: {setting} in the config{flag}.")


def banner(config: Config, host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    scheme = "https" if config.server.tls else "http"
    base = (config.server.public_base_url or f"{scheme}://{shown}:{port}").rstrip("/")
    route = " -> ".join(config.route)
    kinds = ", ".join(f"{b.name} ({b.kind})" for b in config.backends)
    auth = ("no auth (loopback only)" if config.auth.mode == "none"
            else f"member tokens, {len(config.users)} user(s)")
    return "\n".join([
        f"variations-gateway {__version__} listening on {scheme}://{host}:{port}",
        f"  backends: {kinds}; route: {route}",
        f"  auth: {auth}; state: {config.state.kind}",
        *storage_lines(config),
        f"  GIMP plug-in settings -> Gateway URL: {base}",
        f"  OpenAI SDK -> OpenAI(base_url=\"{base}/v1\", api_key=\"<your token>\")",
    ])


async def _start_site(site: object, error: PortInUse) -> None:
    try:
        await site.start()  # type: ignore[attr-defined]
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise error from None
        raise


def _server_tls(config: Config) -> ssl.SSLContext | None:
    """Built before anything listens: read now, so a renewed certificate needs a
    restart."""
    if not (config.server.tls_cert and config.server.tls_key):
        return None
    try:
        return server_context(config.server.tls_cert, config.server.tls_key)
    except TLSFileError as exc:  # changed since the config was loaded
        raise ConfigError(str(exc), exc.setting) from None


async def _start_metrics(app: Any, config: Config, host: str, tls: ssl.SSLContext | None
                         ) -> Any:
    """``/metrics`` on ``metrics.port`` (same TLS as the API port: it names members and
    their spend); the runner to clean up, or None when it has no port of its own."""
    if not config.metrics.enabled or config.metrics.port is None:
        return None
    from aiohttp import web

    from gateway import health
    from gateway.connections import GatewayRunner
    from gateway.keys import LIVE, METRICS

    mapp = web.Application()
    mapp[LIVE], mapp[METRICS] = app[LIVE], app[METRICS]
    mapp.router.add_get("/metrics", health.metrics)
    runner = GatewayRunner(
        mapp, access_log=None, header_timeout=config.server.header_timeout_seconds,
        keepalive_timeout=config.server.keepalive_timeout_seconds)
    await runner.setup()
    try:
        await _start_site(web.TCPSite(runner, host, config.metrics.port, ssl_context=tls),
                          _port_in_use(host, config.metrics.port, "metrics.port", ""))
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def _serve(config: Config, host: str, port: int, path: str | None = None,
                 sha256: str | None = None) -> int:
    from aiohttp import web

    from gateway.app import build_app
    from gateway.connections import GatewayRunner, raise_fd_limit
    from gateway.reload import Reloader

    tls = _server_tls(config)
    open_files, _ = raise_fd_limit()  # every client connection is a file descriptor

    # Signals are handled from the first moment: a SIGTERM during start-up cancels the
    # start-up and cleans up what was started (the default action would kill the
    # process and leave the procedural workers behind).
    stop = asyncio.Event()
    main = asyncio.current_task()
    started = False

    def on_signal() -> None:
        if stop.is_set():  # once: a second Ctrl-C must not cut the clean-up short
            return
        stop.set()
        if not started and main is not None:
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, on_signal)
    app = build_app(config, sha256)
    reloader = Reloader(app, path, lambda new: check_bind(new, host))
    reloads: set[asyncio.Task[bool]] = set()

    def on_reload() -> None:  # SIGHUP (systemctl reload): re-read the config file
        if not started or stop.is_set():
            print("variations-gateway: SIGHUP ignored while starting or stopping; the "
                  "config file is read again on the next SIGHUP", file=sys.stderr, flush=True)
            return
        task = asyncio.get_running_loop().create_task(reloader.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_reload)
    runner = GatewayRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.server.shutdown_timeout_seconds,
                           header_timeout=config.server.header_timeout_seconds,
                           keepalive_timeout=config.server.keepalive_timeout_seconds)
    metrics_runner = None
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls,
                           shutdown_timeout=config.server.shutdown_timeout_seconds)
        await _start_site(site, _port_in_use(
            host, port, "server.port", f", or `serve --port {port + 1}` "
            f"(make run PORT={port + 1})"))
        metrics_runner = await _start_metrics(app, config, host, tls)
        bound = runner.addresses[0][1] if runner.addresses else port
        print(banner(config, host, bound), flush=True)
        print(f"  open files: up to {open_files} (connections without a whole request "
              f"header are closed after {config.server.header_timeout_seconds:g} s)",
              flush=True)
        started = True
        await stop.wait()
        print("variations-gateway: shutting down (finishing requests in flight)",
              flush=True)
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        print("variations-gateway: stopped during start-up", flush=True)
    finally:
        await asyncio.gather(*reloads, return_exceptions=True)  # not cut off halfway
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
    return 0


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (``mallopt(M_ARENA_MAX)``, as ``MALLOC_ARENA_MAX=2``).

    glibc gives threads their own arenas; freed image buffers then fragment across them
    and RSS creeps up on a long-running edge box (16% over 20,000 requests in make
    bench, 8% with two arenas). Must run before any thread starts; a no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-8, arenas)


def unwritable_advice(directory: Path) -> str:
    """What to do about a state directory this process cannot write in: in a container,
    usually a host directory owned by root, mounted where uid 10001 keeps its state."""
    uid = os.getuid()
    return (f"{directory} is not writable by uid {uid}, which this gateway runs as. "
            f"Give it that user: chown -R {uid} {directory} (for a bind mount, on the "
            f"host directory you mounted there; under rootless podman, whose uid {uid} "
            f"is another on the host: podman unshare chown -R {uid} DIR, or mount it "
            "with :U), or use a named volume")


def cmd_serve(args: argparse.Namespace) -> int:
    # SIGHUP's default action ends the process, and until _serve installs the reload
    # handler (after the config, the imports and build_app, which may wait for Redis) a
    # `systemctl reload` would kill the gateway with a status systemd counts as clean.
    # Ignored until then: the config being read now is the newest one anyway.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return _serve_command(args)
    finally:  # as it was (serve run in-process by a test, children it starts later)
        signal.signal(signal.SIGHUP, previous)


def _serve_command(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.sqlite import StateInUse
    from gateway.state import sqlite_files, unwritable_dir

    limit_malloc_arenas()


    config, sha256 = read_config(args.config)
    host: str = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    check_bind(config, host)
    for line in config_warnings(config):
        print(f"variations-gateway: {line}", file=sys.stderr, flush=True)
    logs.configure(config.logging.level, config.logging.format)
    plain = plain_http_warning(config, host)
    if plain is not None:
        import structlog

        structlog.get_logger("gateway.server").warning("plain_http_beyond_loopback",
                                                       host=host, advice=plain)
        print(f"variations-gateway: warning: {plain}", file=sys.stderr, flush=True)
    blocked = unwritable_dir(config)
    if blocked is not None:
        print(f"variations-gateway: cannot start: {unwritable_advice(blocked)}",
              file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        try:
            return asyncio.run(_serve(config, host, port, args.config, sha256))
        except StateInUse as exc:
            print(f"variations-gateway: {exc}", file=sys.stderr)
            return 1
        except sqlite3.Error as exc:  # SQLite's message names no file: list them
            print(f"variations-gateway: SQLite said \"{exc}\" with one of "
                  f"{', '.join(map(str, sqlite_files(config)))}. Is the disk full or "
                  "read-only, or is a file locked by another program?", file=sys.stderr)
            return 1
        except PortInUse as exc:
            print(f"variations-gateway: cannot start: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # a directory that cannot be created, an address not here
            print(f"variations-gateway: cannot start: {exc}", file=sys.stderr)
            return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.path)
    check_bind(config, config.server.host)
    sys.stdout.write(dump_config(config))
    warning = plain_http_warning(config, config.server.host)
    if warning is not None:
        print(f"# warning: {warning}", file=sys.stderr)
    for warning in config_warnings(config):
        print(f"# {warning}", file=sys.stderr)
    print(f"# {args.path}: OK", file=sys.stderr)
    return 0


def cmd_add_user(args: argparse.Namespace) -> int:

    from gateway.auth import new_token, token_sha256

    name = args.name
    if args.admin:
        if name is not None:
            print("add-user: --admin makes the admin token; it takes no name",
                  file=sys.stderr)
            return 2
    elif name is None or not USER_NAME.fullmatch(name) or name in RESERVED_USER_NAMES:
        print("add-user: names use letters, digits, '_', '.', '@', '-' (max 64); "
              f"{' and '.join(sorted(RESERVED_USER_NAMES))} are reserved", file=sys.stderr)
        return 2
    token = new_token()
    if args.admin:
        print("Admin token (shown once; keep it safe, it is not stored anywhere; it opens "
              "/admin/ and no API route):")
        print(f"  {token}")
        print()
        print("Set this in the gateway config, then reload it (systemctl reload, or SIGHUP):")
        print("auth:")
        print("  mode: tokens")
        print(f"  admin_token_sha256: {token_sha256(token)}")
        print()
        print("Call the admin API with the header `Authorization: Bearer <this token>`, "
              "e.g. GET /admin/usage.")
        return 0
    print(f"Token for {name} (shown once; give it to {name}, it is not stored anywhere):")
    print(f"  {token}")
    print()
    print("Add this under `users:` in the gateway config, make sure the config says "
          "`auth: {mode: tokens}` (with auth.mode: none members are refused), then "
          "reload it (systemctl reload, or SIGHUP):")
    print(f"  {name}:")
    print(f"    token_sha256: {token_sha256(token)}")
    return 0


def cmd_vary(args: argparse.Namespace) -> int:
    from gateway.client import vary

    return vary(args)


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from gateway import healthcheck

    url = healthcheck.target(load_config(args.config), args.host, args.port)
    problem = healthcheck.probe(url)
    if problem is not None:
        print(f"variations-gateway: unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


def cmd_install_gimp_plugin(args: argparse.Namespace) -> int:
    from gateway import gimp_install

    return gimp_install.run(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="variations-gateway", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="YAML config (default: $VARIATIONS_GATEWAY_CONFIG, "
                   "else built-in defaults)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)

    h = sub.add_parser("healthcheck", help="exit 0 when the gateway of this config answers "
                       "/healthz (for container HEALTHCHECKs)")
    h.add_argument("--config", help="YAML config (default: $VARIATIONS_GATEWAY_CONFIG, "
                   "else built-in defaults)")
    h.add_argument("--host", help="as given to serve --host")
    h.add_argument("--port", type=int, help="as given to serve --port")
    h.set_defaults(func=cmd_healthcheck)

    c = sub.add_parser("check-config", help="validate a config and print it, secrets masked")
    c.add_argument("path")
    c.set_defaults(func=cmd_check_config)

    a = sub.add_parser("add-user", help="make a member (or admin) token and its config "
                       "snippet")
    a.add_argument("name", nargs="?", default=None,
                   help="the member's name (not with --admin)")
    a.add_argument("--admin", action="store_true",
                   help="make the admin token (auth.admin_token_sha256) instead")
    a.set_defaults(func=cmd_add_user)

    v = sub.add_parser("vary", help="call a gateway and write the variations as PNGs")
    v.add_argument("image", type=Path)
    v.add_argument("-n", type=int, default=1)
    v.add_argument("--size", default="1024x1024", choices=["256x256", "512x512", "1024x1024"])
    v.add_argument("-o", "--output", type=Path, default=Path("."))
    v.add_argument("--url", default=None, help="gateway URL (default: $VARIATIONS_GATEWAY_URL "
                   "or http://127.0.0.1:8080)")
    v.add_argument("--token", default=None, help="member token (default: "
                   "$VARIATIONS_GATEWAY_TOKEN)")
    v.add_argument("--user", default=None, help="end-user id recorded for abuse monitoring")
    v.add_argument("--fresh", action="store_true", help="bypass the gateway cache")
    v.add_argument("--square", choices=["crop", "pad"], default="crop",
                   help="a non-square image: centre-crop it (default) or pad it with "
                   "transparency; any format Pillow reads is sent as PNG")
    v.set_defaults(func=cmd_vary)

    cli_users.add_parser(sub)
    cli_usage.add_parser(sub)

    g = sub.add_parser("install-gimp-plugin", help="install the GIMP 3 plug-in for this user")
    try:
        from gateway import gimp_install

        gimp_install.add_arguments(g)
    except ImportError:  # pragma: no cover - during development only
        pass
    g.set_defaults(func=cmd_install_gimp_plugin)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"variations-gateway: config error: {exc}", file=sys.stderr)
        return 2
