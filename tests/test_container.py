"""The container image, built and run for real (issue 23): podman builds deploy/Dockerfile
in Docker format against a stand-in for ``python:3.11-slim-bookworm`` made with
debootstrap (tests/container/build_base.sh, cached), runs it with the image's own config
(deploy/container.yaml) and a member from the environment, and checks what a user of
``docker run`` meets; then two replicas and a Redis under podman-compose, from
deploy/compose.yaml, share quotas and the cache.

No registry is reachable on these machines, so nothing is pulled: the base and the Redis
image are built here from Debian packages. How the stand-in differs from the real base
is printed with the image size. podman is pointed at files inside the test's folder
(CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, TMPDIR): nothing of the host's podman is
touched. Under CI=true nothing here skips.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support import IN_CI, eventually_sync, free_port, multipart_body, png_bytes

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BASE = "localhost/python:3.11-slim-bookworm"
IMAGE = "localhost/variations-gateway:test"
REDIS_IMAGE = "localhost/vg-redis:test"
TOKEN = "vg-container-test-artist-token"
# docker stop's default: the shipped config's shutdown_timeout_seconds must fit in it.
DOCKER_STOP_TIMEOUT = 10
START_DEADLINE = 60.0
# Recorded 2026-12-03 (main at 823bbe6): the image before the lock and the pip clean-up.
BEFORE_MB = 271
STAND_IN = ("stand-in base: Debian 12's python3 (3.11.2, not the newest 3.11.x), Debian's "
            "pip/setuptools wheels for new venvs, the system CA store (with the host's "
            "extra CAs) instead of certifi, and a larger base than python:3.11-slim")

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, rootful podman)"
    for tool in ("podman", "podman-compose", "debootstrap"):
        if not shutil.which(tool):
            return f"needs {tool} (make system-deps installs it)"
    return None


@dataclass(frozen=True)
class Podman:
    """podman with its own containers.conf and storage.conf, both under ``home``."""

    home: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            tool: str = "podman", stdin: bytes | None = None
            ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([tool, *args], env=self.env, capture_output=True, timeout=timeout,
                           text=stdin is None, input=stdin)
        out = r.stdout if isinstance(r.stdout, str) else r.stdout.decode(errors="replace")
        err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
        done = subprocess.CompletedProcess(r.args, r.returncode, out, err)
        if check and r.returncode != 0:
            pytest.fail(f"{tool} {' '.join(args[:3])} failed ({r.returncode}):\n"
                        f"{err[-3000:]}\n{out[-2000:]}")
        return done


def _podman_home(home: Path) -> Podman:
    """The settings these VMs need (shared/reference containers.md): no CAP_SYS_RESOURCE
    and a hard nofile of 20000, cgroups in hybrid mode (runc, cgroupfs), no systemd
    (file events; healthchecks run by hand)."""
    for d in ("storage", "run", "tmp", "libpod", "networks"):
        (home / d).mkdir(parents=True, exist_ok=True)
    (home / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]\n'
        "[engine]\n"
        'runtime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'events_logfile_path = "{home}/events.log"\ntmp_dir = "{home}/libpod"\n'
        # CNI: netavark 1.4's bridges pass no traffic on these VMs (not even host to
        # container); CNI's do, and its dnsname plugin resolves compose service names.
        "[network]\n"
        f'network_backend = "cni"\nnetwork_config_dir = "{home}/networks"\n')
    (home / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\nrunroot = "{home}/run"\n'
        f'graphroot = "{home}/storage"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(home / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(home / "storage.conf"),
           "TMPDIR": str(home / "tmp"),
           # podman-compose builds in OCI format otherwise, which drops HEALTHCHECK.
           "BUILDAH_FORMAT": "docker"}
    return Podman(home, env)


def _context(dest: Path) -> Path:
    """The build context: the working tree (what would be committed), with the FROM
    lines naming the local stand-in instead of the registry image."""
    ignore = shutil.ignore_patterns(".git", ".venv", "var", "__pycache__", "*.egg-info",
                                    ".pytest_cache", ".mypy_cache", ".ruff_cache", "build")
    shutil.copytree(REPO, dest, ignore=ignore)
    dockerfile = dest / "deploy" / "Dockerfile"
    text = dockerfile.read_text()
    assert text.count("FROM python:3.11-slim-bookworm") == 2
    dockerfile.write_text(text.replace("FROM python:3.11-slim-bookworm", f"FROM {BASE}"))
    return dest


@dataclass(frozen=True)
class Built:
    podman: Podman
    size_mb: float
    cold_s: float
    warm_s: float


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    why = _missing()
    if why:
        if IN_CI:
            pytest.fail(f"the container test cannot run under CI: {why}")
        pytest.skip(why)
    top = tmp_path_factory.mktemp("container")
    podman = _podman_home(top / "podman")
    try:
        yield _build(podman, top)
    finally:
        _clean(podman)


def _build(podman: Podman, top: Path) -> Built:
    base = subprocess.run(["bash", str(HERE / "container" / "build_base.sh")],
                          capture_output=True, text=True, timeout=1200)
    if base.returncode != 0:
        pytest.fail(f"building the stand-in base failed:\n{base.stderr[-3000:]}")
    root = base.stdout.strip().splitlines()[-1]
    tar = subprocess.run(["tar", "-C", root, "-c", "."], capture_output=True, check=True,
                         timeout=300).stdout
    podman.run("import", "--change",
               "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
               "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", BASE,
               stdin=tar, timeout=300)
    context = _context(top / "context")
    build = ("build", "--pull=never", "--format", "docker",
             "-f", "deploy/Dockerfile",
             "-t", IMAGE, str(context))
    t0 = time.monotonic()
    podman.run(*build, timeout=900)
    cold = time.monotonic() - t0
    t0 = time.monotonic()
    podman.run(*build, timeout=900)  # every layer from the cache
    warm = time.monotonic() - t0
    size = int(podman.run("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\nimage {IMAGE}: {size / 1e6:.0f} MB (before the lock and pip clean-up: "
          f"{BEFORE_MB} MB); build {cold:.0f} s cold, {warm:.1f} s warm\n{STAND_IN}")
    return Built(podman, size / 1e6, cold, warm)


def _clean(podman: Podman) -> None:
    """Everything this module made goes, then its storage: nothing is left mounted."""
    for args in (("rm", "--all", "--force", "--time", "0"), ("volume", "prune", "--force"),
                 ("network", "prune", "--force"), ("rmi", "--all", "--force")):
        with contextlib.suppress(subprocess.SubprocessError):
            podman.run(*args, check=False, timeout=120)
    subprocess.run(["umount", "-R", str(podman.home / "storage" / "overlay")],
                   capture_output=True, check=False)
    shutil.rmtree(podman.home, ignore_errors=True)


def _get(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        return exc.code, body, dict(exc.headers)
    except OSError:
        return 0, b"", {}


def _vary(base: str, image: bytes, token: str = TOKEN) -> tuple[int, dict, dict]:
    boundary = uuid.uuid4().hex
    body = multipart_body({"n": "2", "size": "256x256"}, image, boundary)
    req = urllib.request.Request(
        f"{base}/v1/images/variations", data=body, method="POST",
        headers={"Authorization": f"Bearer {token}",
                 "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as exc:
        answer = json.loads(exc.read() or b"{}")
        exc.close()
        return exc.code, answer, dict(exc.headers)


def _healthy(url: str) -> bool:
    return _get(url, timeout=2)[0] == 200


def _url(port: int = 8080) -> tuple[str, str]:
    """The -e every run of the image needs: the address clients use."""
    return "-e", f"VARIATIONS_GATEWAY_PUBLIC_URL=http://127.0.0.1:{port}"


def _members() -> str:
    return f"artist={hashlib.sha256(TOKEN.encode()).hexdigest()}"


# ------------------------------------------------------------------- one container


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The gateway's one line (podman may add warnings of its own, "WARN[...]")."""
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(("WARN[", "time="))]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_without_its_settings_the_image_says_what_to_set(built: Built) -> None:
    r = built.podman.run("run", "--rm", IMAGE, check=False, timeout=60)
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert ("VARIATIONS_GATEWAY_PUBLIC_URL is not set: set VARIATIONS_GATEWAY_PUBLIC_URL "
            "to the address clients use") in line
    r = built.podman.run("run", "--rm", *_url(), IMAGE, check=False, timeout=60)
    assert r.returncode == 2, r.stderr
    line = _one_line(r)
    assert "VARIATIONS_GATEWAY_MEMBERS is not set: set VARIATIONS_GATEWAY_MEMBERS=" in line
    assert "mount a config of your own at /etc/variations-gateway/gateway.yaml" in line


def test_a_root_owned_state_dir_says_the_chown(built: Built, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # root's, as `mkdir` on the host makes it
    run = ("run", "--rm", *_url(), "-e", f"VARIATIONS_GATEWAY_MEMBERS={_members()}",
           "-v", f"{state}:/var/lib/variations-gateway", IMAGE)
    r = built.podman.run(*run, check=False, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert ("/var/lib/variations-gateway is not writable by uid 10001, which this "
            "gateway runs as. Give it that user: chown -R 10001 /var/lib/variations-gateway"
            ) in r.stderr
    assert "podman unshare chown -R 10001 DIR, or mount it with :U" in r.stderr
    os.chown(state, 10001, 10001)  # the fix the message gives
    # A signing key left there by root: one line, not FileExistsError from a new one.
    key = state / "signing.key"
    key.write_text("ab" * 32)
    key.chmod(0o600)
    r = built.podman.run(*run, check=False, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert ("/var/lib/variations-gateway/signing.key (the image URL signing key) cannot "
            "be read by uid 10001 (Permission denied): give it that user") in r.stderr
    os.chown(key, 10001, 10001)
    name = f"vg-chown-{uuid.uuid4().hex[:8]}"
    built.podman.run("run", "-d", "--name", name, *_url(), "-e",
                     f"VARIATIONS_GATEWAY_MEMBERS={_members()}",
                     "-v", f"{state}:/var/lib/variations-gateway", IMAGE)
    try:
        eventually_sync(lambda: (state / "audit.sqlite3").exists(),
                        "the gateway to write its state once the directory is 10001's",
                        START_DEADLINE)
    finally:
        built.podman.run("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture(scope="module")
def served(built: Built) -> Iterator[tuple[str, str, str]]:
    """The image as the README runs it: published port, member from the environment,
    state on a named volume. Yields (base URL, container name, volume name)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    name, volume = f"vg-{uuid.uuid4().hex[:8]}", f"vg-state-{uuid.uuid4().hex[:8]}"
    built.podman.run("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080",
                     "-e", f"VARIATIONS_GATEWAY_MEMBERS={_members()}",
                     "-e", f"VARIATIONS_GATEWAY_PUBLIC_URL={base}",
                     "-v", f"{volume}:/var/lib/variations-gateway", IMAGE)
    try:
        eventually_sync(lambda: _healthy(f"{base}/healthz"), lambda: "the container to "
                        "answer /healthz; its log:\n" + built.podman.run(
                            "logs", name, check=False).stderr[-3000:], START_DEADLINE)
        yield base, name, volume
    finally:
        built.podman.run("rm", "--force", "--time", "0", name, check=False)


def test_the_shipped_config_serves_real_variations(built: Built, served: tuple[str, str, str]
                                                   ) -> None:
    base, name, volume = served
    status, answer, headers = _vary(base, png_bytes(96, seed=23))
    assert status == 200, answer
    assert headers["X-Cache"] == "MISS" and len(answer["data"]) == 2
    for item in answer["data"]:
        assert item["url"].startswith(f"{base}/")  # public_base_url from the environment
        got, png, _ = _get(item["url"])
        assert got == 200 and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert _vary(base, png_bytes(96, seed=23), token="vg-not-a-member")[0] == 401
    # The process runs as uid 10001 (rootful podman, no user namespace: the host's pid).
    pid = built.podman.run("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:"))
    assert uids.split()[1:] == ["10001"] * 4, uids
    # The image's HEALTHCHECK survived (Docker format) and says healthy.
    check = built.podman.run("image", "inspect", "--format", "{{json .HealthCheck}}", IMAGE)
    assert '"variations-gateway","healthcheck"' in check.stdout.replace(" ", ""), check.stdout
    assert built.podman.run("healthcheck", "run", name, check=False).returncode == 0
    # Only the API port is exposed: /metrics (9464) names members, published by hand.
    ports = built.podman.run("image", "inspect", "--format", "{{json .Config.ExposedPorts}}",
                             IMAGE).stdout
    assert list(json.loads(ports)) == ["8080/tcp"], ports
    # State is on the volume: the ledger, the audit trail, the two images.
    mount = Path(built.podman.run("volume", "inspect", "--format", "{{.Mountpoint}}",
                                  volume).stdout.strip())
    assert {"state.sqlite3", "audit.sqlite3", "images", "cache"} <= {
        p.name for p in mount.iterdir()}
    assert len([p for p in (mount / "images").rglob("*") if p.is_file()]) >= 2


def test_sigterm_stops_it_within_dockers_stop_timeout(built: Built,
                                                      served: tuple[str, str, str]) -> None:
    _, name, _ = served
    t0 = time.monotonic()
    built.podman.run("kill", "--signal", "TERM", name)
    # Polled: podman 4.3's `podman wait` can miss an exit that happens while it starts.
    # ("stopped" or "exited", as podman's clean-up has run or not: not running either way)
    eventually_sync(lambda: built.podman.run("inspect", "--format", "{{.State.Running}}",
                                             name).stdout.strip() == "false",
                    lambda: f"the container to exit after SIGTERM, within docker stop's "
                    f"default {DOCKER_STOP_TIMEOUT} s (then it kills); state "
                    + built.podman.run("inspect", "--format", "{{json .State}}", name,
                                       check=False).stdout
                    + built.podman.run("top", name, check=False).stdout
                    + built.podman.run("logs", "--tail", "5", name, check=False).stdout,
                    DOCKER_STOP_TIMEOUT)
    print(f"\nSIGTERM -> exited in {time.monotonic() - t0:.1f} s (docker stop waits "
          f"{DOCKER_STOP_TIMEOUT} s)")
    code = built.podman.run("inspect", "--format", "{{.State.ExitCode}}", name).stdout
    assert code.strip() == "0"
    log = built.podman.run("logs", name).stdout
    assert "shutting down" in log


def test_a_moved_port_is_followed_by_the_healthcheck(built: Built) -> None:
    """VARIATIONS_GATEWAY_PORT moves serve and the HEALTHCHECK together (a hard-wired
    127.0.0.1:8080 probe called `serve --port 9000` unhealthy)."""
    port = free_port()
    name = f"vg-port-{uuid.uuid4().hex[:8]}"
    built.podman.run("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:9000",
                     "-e", f"VARIATIONS_GATEWAY_MEMBERS={_members()}", *_url(port),
                     "-e", "VARIATIONS_GATEWAY_PORT=9000", IMAGE)
    try:
        eventually_sync(lambda: _healthy(f"http://127.0.0.1:{port}/healthz"),
                        "the container to answer on port 9000", START_DEADLINE)
        assert built.podman.run("healthcheck", "run", name, check=False).returncode == 0
    finally:
        built.podman.run("rm", "--force", "--time", "0", name, check=False)


# ------------------------------------------------------------------- podman-compose


def _compose_file(dest: Path) -> Path:
    """deploy/compose.yaml's Redis and gateway services as they are, but with local
    images (nothing can be pulled) and absolute mount paths; nginx, Prometheus and
    Grafana are left out (their images cannot be pulled either): the test talks to
    each replica at its address on the compose network."""
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    redis, gateway = services["redis"], services["variations-gateway"]
    redis["image"] = REDIS_IMAGE
    gateway.pop("build")
    gateway["image"] = IMAGE
    gateway["volumes"] = [str(REPO / "deploy" / v[2:]) if v.startswith("./") else v
                          for v in gateway["volumes"]]
    compose["services"] = {"redis": redis, "variations-gateway": gateway}
    compose["volumes"] = {k: v for k, v in compose["volumes"].items()
                          if k in ("redis-data", "shared")}
    path = dest / "compose.yaml"
    path.write_text(yaml.safe_dump(compose, sort_keys=False))
    return path


def _replica_urls(podman: Podman, project: str) -> list[str]:
    names = podman.run("ps", "--filter", f"label=io.podman.compose.project={project}",
                       "--filter", "label=com.docker.compose.service=variations-gateway",
                       "--format", "{{.Names}}").stdout.split()
    urls = []
    for name in sorted(names):
        nets = json.loads(podman.run("inspect", "--format",
                                     "{{json .NetworkSettings.Networks}}", name).stdout)
        urls.extend(f"http://{n['IPAddress']}:8080" for n in nets.values() if n["IPAddress"])
    return urls


def test_two_replicas_on_redis_share_quotas_and_the_cache(built: Built, tmp_path: Path
                                                          ) -> None:
    podman = built.podman
    podman.run("build", "--pull=never", "--format", "docker",
               "-t", REDIS_IMAGE,
               "-f", str(HERE / "container" / "redis.Containerfile"), str(HERE / "container"),
               timeout=600)
    project = f"vgc{uuid.uuid4().hex[:6]}"
    compose = ["-p", project, "-f", str(_compose_file(tmp_path))]
    env = {"ADMIN_TOKEN_SHA256": hashlib.sha256(b"vg-container-admin").hexdigest(),
           "ARTIST_TOKEN_SHA256": hashlib.sha256(TOKEN.encode()).hexdigest(),
           "PUBLIC_BASE_URL": "http://localhost:8080"}
    compose_podman = Podman(podman.home, {**podman.env, **env})
    compose_podman.run(*compose, "up", "-d", tool="podman-compose", timeout=300)
    try:
        urls = eventually_sync(lambda: len(u := _replica_urls(podman, project)) == 2 and u,
                               "two gateway replicas", START_DEADLINE)
        for url in urls:
            eventually_sync(lambda url=url: _get(f"{url}/readyz", timeout=2)[0] == 200,
                            lambda url=url: f"{url} to be ready (Redis reachable)",
                            START_DEADLINE)
        image = png_bytes(80, seed=2323)
        first = _vary(urls[0], image)
        assert first[0] == 200 and first[2]["X-Cache"] == "MISS", first
        second = _vary(urls[1], image)
        assert second[0] == 200 and second[2]["X-Cache"] == "HIT", second
        # One quota: each replica counts the two images made through the first.
        for url in urls:
            status, body, _ = _get(f"{url}/v1/usage", TOKEN)
            assert status == 200, body
            assert json.loads(body)["limits"]["images_per_day"]["used"] == 2, body
    finally:
        compose_podman.run(*compose, "down", "-v", tool="podman-compose", check=False,
                           timeout=300)
