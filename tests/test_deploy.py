"""The deployment files (issue 7): each is checked by a real tool where one runs here.

systemd-analyze verifies the unit; kubernetes-validate checks the manifests against the
Kubernetes schemas; hadolint lints the Dockerfile; nginx -t checks nginx.conf; the
compose file is parsed and its wiring checked; every embedded gateway config must load.
A deliberately broken copy of each file must fail the same tool, so no check is vacuous.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from doclinks import anchors
from support import build_wheel

from gateway.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "variations-gateway.service"
# What `kubectl apply -f deploy/kubernetes/` reads: only these extensions (cli-runtime's
# FileExtensions), so the Secret example, named *.yaml.example, is never applied.
KUBECTL_EXTENSIONS = (".json", ".yaml", ".yml")
KUBE = sorted(p for p in (DEPLOY / "kubernetes").iterdir() if p.suffix in KUBECTL_EXTENSIONS)
SECRET_EXAMPLE = DEPLOY / "kubernetes" / "secret.yaml.example"
ENV = {"ADMIN_TOKEN_SHA256": "a" * 64, "ARTIST_TOKEN_SHA256": "b" * 64,
       "PUBLIC_BASE_URL": "https://variations.example.com", "OPENAI_API_KEY": "sk-test"}


def tool(name: str) -> str:
    """A tool from the venv (PyPI-shipped binaries) or the system, else skip."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- systemd


def _verify_unit(text: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    # verify insists ExecStart exists on this machine: point it at this checkout's
    # entry point, and check every other line as written.
    exe = Path(sys.executable).parent / "variations-gateway"
    unit = tmp / "variations-gateway.service"
    unit.write_text(text.replace("/opt/variations-gateway/bin/variations-gateway", str(exe)))
    return run(tool("systemd-analyze"), "verify", str(unit))


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "ExecStart=/opt/variations-gateway/bin/variations-gateway serve" in text
    for directive in ("DynamicUser=yes", "ProtectSystem=strict",
                      "StateDirectory=variations-gateway", "NoNewPrivileges=yes",
                      "ExecReload=/bin/kill -HUP $MAINPID"):  # systemctl reload: SIGHUP
        assert directive in text.splitlines(), directive
    result = _verify_unit(text, tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
    # --threshold is in tenths: fail above an exposure of 2.0 ("OK" is below 4.0).
    security = run(tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20",
                   str(tmp_path / "variations-gateway.service"))
    assert security.returncode == 0, security.stdout[-2000:]
    broken = _verify_unit(text.replace("ProtectSystem=strict", "ProtectSytem=strict"), tmp_path)
    assert "Unknown key" in broken.stderr


# --------------------------------------------------------------------------- kubernetes


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests_validate_against_the_schemas(tmp_path: Path) -> None:
    validator = tool("kubernetes-validate")
    result = run(validator, "--strict", *map(str, KUBE), str(SECRET_EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {d["kind"]: d for p in [*KUBE, SECRET_EXAMPLE] for d in _docs(p)}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "StatefulSet",
            "HorizontalPodAutoscaler"} <= set(kinds)
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    broken = tmp_path / "broken.yaml"
    broken.write_text((DEPLOY / "kubernetes" / "deployment.yaml").read_text()
                      .replace("containerPort: 8080", "containerPort: eighty"))
    assert run(validator, "--strict", str(broken)).returncode != 0


def test_applying_the_directory_never_overwrites_the_real_secret() -> None:
    """`kubectl apply -f deploy/kubernetes/` (docs/deploy.md) must hold no Secret: it would
    replace the one made with `kubectl create secret` by the placeholders."""
    applied = {d["kind"] for p in KUBE for d in _docs(p)}
    assert "Secret" not in applied
    assert SECRET_EXAMPLE.suffix not in KUBECTL_EXTENSIONS
    (secret,) = _docs(SECRET_EXAMPLE)
    assert secret["kind"] == "Secret"
    deployment = next(d for p in KUBE for d in _docs(p) if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    readme = (ROOT / "docs" / "deploy.md").read_text()
    assert "kubectl apply -f deploy/kubernetes/secret.yaml " not in readme
    assert f"kubectl create secret generic {secret['metadata']['name']}" in readme


def test_the_configmap_holds_a_valid_redis_gateway_config() -> None:
    (cm,) = _docs(DEPLOY / "kubernetes" / "configmap.yaml")
    text = cm["data"]["gateway.yaml"]
    config = parse_config(text, ENV)
    assert config.state.kind == "redis" and config.audit.stdout
    assert config.state.redis_url == "redis://variations-gateway-redis:6379/0"
    # Every variable without a default is a key of the Secret (docs/deploy.md's command
    # too).
    (secret,) = _docs(SECRET_EXAMPLE)
    required = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    assert required and required <= set(secret["stringData"]), required
    readme = (ROOT / "docs" / "deploy.md").read_text()
    for name in required:
        assert f"--from-literal={name}=" in readme, name
    # The route reaches a backend that exists: not dall-e-2's /v1/images/variations at
    # OpenAI, shut down on 2026-05-12.
    routed = [b for b in config.backends if b.name in config.route]
    assert routed and not any(b.kind == "openai" and "api.openai.com" in b.options.base_url
                              for b in routed)
    # A rollout lets a generation in flight finish before the pod is killed.
    deployment = next(d for p in KUBE for d in _docs(p) if d["kind"] == "Deployment")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    longest = max(b.timeout_seconds for b in routed)
    assert longest < config.server.shutdown_timeout_seconds < grace


def test_kubernetes_scrapes_metrics_on_their_own_port_only() -> None:
    """Issue 19, item 11: the pods bind 0.0.0.0, so /metrics (member names and spend)
    is not on the API port the Service and ingress expose, but on metrics.port, which
    the Prometheus annotations name and the Service does not."""
    (cm,) = _docs(DEPLOY / "kubernetes" / "configmap.yaml")
    config = parse_config(cm["data"]["gateway.yaml"], ENV)
    assert config.server.host == "0.0.0.0" and config.metrics.enabled
    assert config.metrics.port is not None and config.metrics.port != config.server.port
    assert config.server.public_base_url == ENV["PUBLIC_BASE_URL"]  # not the Host header
    deployment = next(d for p in KUBE for d in _docs(p) if d["kind"] == "Deployment")
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(
        config.metrics.port)
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.server.port, "metrics": config.metrics.port}
    service = next(d for p in KUBE for d in _docs(p) if d["kind"] == "Service"
                   and d["metadata"]["name"] == "variations-gateway")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}
    # Without the port (and no token) the same config is refused, with a sentence.
    text = cm["data"]["gateway.yaml"].replace(f"port: {config.metrics.port}", "port: null")
    with pytest.raises(ValueError, match=re.escape("metrics.token_sha256")):
        parse_config(text, ENV)


# --------------------------------------------------------------------------- compose


def test_compose_file_wires_replicas_redis_proxy_and_monitoring() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "variations-gateway", "nginx", "prometheus", "grafana"} <= set(services)
    gw = services["variations-gateway"]
    assert gw["deploy"]["replicas"] == 2
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"
    assert (DEPLOY / gw["build"]["context"] / gw["build"]["dockerfile"]).is_file()
    named = set(compose["volumes"])
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named, f"{name} mounts undeclared volume {source}"
    # The gateway config it mounts loads, with the variables compose passes.
    config_src = next(m.split(":")[0] for m in gw["volumes"] if m.endswith(".yaml:ro"))
    config = parse_config((DEPLOY / config_src).read_text(), ENV)
    assert config.state.kind == "redis" and config.server.host == "0.0.0.0"
    assert config.images.dir.startswith("/var/lib/variations-gateway/shared")
    assert config.cache.dir.startswith("/var/lib/variations-gateway/shared")
    assert config.server.public_base_url == ENV["PUBLIC_BASE_URL"]
    # No localhost default for the address image URLs are built on: remote clients
    # would be handed links to themselves. Both the compose file and the config say so.
    assert ":?" in gw["environment"]["PUBLIC_BASE_URL"]
    without = {k: v for k, v in ENV.items() if k != "PUBLIC_BASE_URL"}
    with pytest.raises(ValueError, match="set PUBLIC_BASE_URL to the address clients use"):
        parse_config((DEPLOY / config_src).read_text(), without)
    # Issue 19, item 11: Prometheus scrapes metrics.port, which compose exposes to its
    # network only (never published); the API port nginx fronts serves no /metrics.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert config.metrics.port is not None and config.metrics.token_sha256 is None
    assert [d["port"] for d in job["dns_sd_configs"]] == [config.metrics.port]
    assert str(config.metrics.port) in gw["expose"] and "ports" not in gw
    assert not any(str(config.metrics.port) in str(p) for svc in services.values()
                   for p in svc.get("ports", []))
    docker = shutil.which("docker")
    if docker and run(docker, "compose", "version").returncode == 0:
        env_args = [f"{k}={v}" for k, v in ENV.items()]
        result = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"),
                                 "config", "--quiet"], capture_output=True, text=True,
                                env={**dict(a.split("=", 1) for a in env_args),
                                     "PATH": "/usr/bin:/bin"}, timeout=60)
        assert result.returncode == 0, result.stderr


def test_the_commented_compose_backend_is_valid_when_uncommented() -> None:
    """Its AI backend example, uncommented as its comment says, still loads."""
    text = (DEPLOY / "config" / "gateway.compose.yaml").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - name: "))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  #   "))
    for i in range(start, end):
        lines[i] = "  " + lines[i][4:]
    name = re.match(r"  - name: (\S+)", lines[start]).group(1)
    uncommented = "\n".join(lines).replace("route: [local]", f"route: [{name}, local]")
    config = parse_config(uncommented, ENV)
    (backend,) = [b for b in config.backends if b.name == name]
    assert backend.kind != "openai" or "api.openai.com" not in backend.options.base_url


def _nginx_version(nginx: str) -> tuple[int, ...]:
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", run(nginx, "-v").stderr)
    assert found, "nginx -v printed no version"
    return tuple(map(int, found.groups()))


RESOLVE_SINCE = (1, 27, 3)  # `server ... resolve` in open-source nginx


def test_nginx_conf_parses(tmp_path: Path) -> None:
    nginx = tool("nginx")
    text = (DEPLOY / "nginx.conf").read_text()
    # The upstream follows the replicas' addresses: `resolve`, which needs a zone.
    assert re.search(r"server variations-gateway:8080 resolve\b", text)
    assert re.search(r"upstream gateway \{\s*zone gateway \d+k;", text)
    # ... so compose must run an nginx that has `resolve`.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    tag = compose["services"]["nginx"]["image"].split(":")[1]
    image = tuple(map(int, re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", tag).group(1, 2)))
    assert image > RESOLVE_SINCE[:2], f"{tag}: a 1.27 tag may predate 1.27.3"
    conf = tmp_path / "nginx.conf"
    if _nginx_version(nginx) >= RESOLVE_SINCE:
        # With `resolve` nothing is looked up at start: the file is checked as it is,
        # and a copy without the zone must fail.
        conf.write_text(text)
        broken = tmp_path / "broken.conf"
        broken.write_text(re.sub(r"zone gateway \d+k;", "", text))
        failed = run(nginx, "-t", "-c", str(broken), "-p", str(tmp_path), "-e", "/dev/stderr")
        assert failed.returncode != 0 and "shared memory" in failed.stderr, failed.stderr
    else:
        # An older nginx (Debian 12 ships 1.22) lacks `resolve` and resolves upstream
        # names at start: check everything else, the name pointed at loopback.
        conf.write_text(text.replace(" resolve ", " ")
                        .replace("variations-gateway:8080", "127.0.0.1:8080"))
    result = run(nginx, "-t", "-c", str(conf), "-p", str(tmp_path), "-e", "/dev/stderr")
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- docs


def test_operations_files_point_at_docs_that_exist() -> None:
    """Pointers in deploy/ and config/ name pages (README.md, docs/*.md) and sections
    of them that exist."""
    seen = 0
    for path in [*DEPLOY.rglob("*"), *(ROOT / "config").rglob("*")]:
        if not path.is_file() or path.suffix == ".png":
            continue
        text = path.read_text(errors="replace")
        for doc in re.findall(r"docs/[\w./-]+", text):
            assert (ROOT / doc).exists(), f"{path.name} points at missing {doc}"
        for page, anchor in re.findall(r"(README(?:\.md)?|docs/[\w-]+\.md)#([\w-]+)", text):
            page = "README.md" if page == "README" else page
            assert anchor in anchors((ROOT / page).read_text()), \
                f"{path.name}: no section #{anchor} in {page}"
            seen += 1
    assert seen >= 5


# --------------------------------------------------------------------------- Dockerfile


def test_the_dockerfile_build_stage_has_every_file_the_package_needs(tmp_path: Path) -> None:
    """The image is not built here: build the wheel from exactly what its build stage
    COPYs, so a new package-data path (the GIMP plug-in) cannot be left out of it."""
    build_stage = (DEPLOY / "Dockerfile").read_text().split("\nFROM ")[1]
    copied = [src for line in build_stage.splitlines() if line.startswith("COPY ")
              for src in line.split()[1:-1]]
    assert "gateway" in copied
    with zipfile.ZipFile(build_wheel(copied, tmp_path)) as wheel:
        names = set(wheel.namelist())
    # pyproject lists the packages: a new one left out of it would be missing here.
    root = DEPLOY.parent
    modules = {p.relative_to(root).as_posix() for p in (root / "gateway").rglob("*.py")}
    assert modules <= names, modules - names
    assert {"gateway/openapi.json", "gateway/gimp_plugin/generate-variations.py",
            "gateway/gimp_plugin/vg_client.py"} <= names


def test_dockerfile_lints_clean_and_runs_unprivileged(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    dockerfile = DEPLOY / "Dockerfile"
    result = run(hadolint, "--no-color", str(dockerfile))
    assert result.returncode == 0, result.stdout
    text = dockerfile.read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and all("-slim" in s for s in stages)
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert 'CMD ["variations-gateway", "healthcheck"]' in text  # the config's port and TLS
    # State on the volume; the config is the image's own (deploy/container.yaml), or a
    # file mounted over it.
    assert 'VOLUME ["/var/lib/variations-gateway"]' in text
    assert "COPY deploy/container.yaml /etc/variations-gateway/gateway.yaml" in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("WORKDIR /src", "RUN cd /src"))
    assert run(hadolint, "--no-color", str(broken)).returncode != 0


def test_the_images_own_config_serves_beyond_loopback_from_the_environment() -> None:
    """deploy/container.yaml (the image's /etc/variations-gateway/gateway.yaml): what
    `docker run -p 8080:8080 -e VARIATIONS_GATEWAY_MEMBERS=...` needs, and one sentence
    saying what to set when the members are missing."""
    from gateway.config import ConfigError

    text = (DEPLOY / "container.yaml").read_text()
    url = {"VARIATIONS_GATEWAY_PUBLIC_URL": "https://vg.example"}
    with pytest.raises(ConfigError, match=r"VARIATIONS_GATEWAY_MEMBERS is not set: set "
                       r"VARIATIONS_GATEWAY_MEMBERS=name=<token sha256>.* or mount a config"):
        parse_config(text, url)
    cfg = parse_config(text, {**url, "VARIATIONS_GATEWAY_MEMBERS": f"artist={'c' * 64}"})
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080
    assert cfg.auth.mode == "tokens" and list(cfg.users) == ["artist"]
    assert cfg.server.public_base_url == "https://vg.example"
    assert cfg.metrics.port == 9464 and [b.kind for b in cfg.backends] == ["procedural"]
    assert cfg.metrics.token_sha256 is None and not cfg.server.tls
    # Everything written is on the image's VOLUME; a stop fits in docker's default 10 s.
    volume = re.search(r'VOLUME \["([^"]+)"\]', (DEPLOY / "Dockerfile").read_text())
    assert volume is not None
    for path in (cfg.state.path, cfg.cache.dir, cfg.images.dir, cfg.audit.path):
        assert path.startswith(volume.group(1) + "/"), path
    assert cfg.server.shutdown_timeout_seconds < 10
    moved = parse_config(text, {"VARIATIONS_GATEWAY_MEMBERS": f"artist={'c' * 64}",
                                "VARIATIONS_GATEWAY_PORT": "9000",
                                "VARIATIONS_GATEWAY_PUBLIC_URL": "https://vg.example"})
    assert moved.server.port == 9000 and moved.server.public_base_url == "https://vg.example"


def test_the_images_own_config_needs_the_address_clients_use() -> None:
    """A default of http://localhost:8080 gave remote clients localhost image links and
    passed the check meant to make the admin choose an address."""
    from gateway.config import ConfigError

    text = (DEPLOY / "container.yaml").read_text()
    members = {"VARIATIONS_GATEWAY_MEMBERS": f"artist={'c' * 64}"}
    for env in (members, {**members, "VARIATIONS_GATEWAY_PUBLIC_URL": ""}):
        with pytest.raises(ConfigError) as info:
            parse_config(text, env)
        message = str(info.value)
        assert "server.public_base_url: VARIATIONS_GATEWAY_PUBLIC_URL is not set: set " \
               "VARIATIONS_GATEWAY_PUBLIC_URL to the address clients use" in message
        assert "-p 127.0.0.1:8080:8080" in message and "plain http" in message


def test_the_images_metrics_token_and_tls_come_from_the_environment(tmp_path: Path) -> None:
    from tls_certs import make_test_ca

    certs = make_test_ca(tmp_path)
    env = {"VARIATIONS_GATEWAY_MEMBERS": f"artist={'c' * 64}",
           "VARIATIONS_GATEWAY_PUBLIC_URL": "https://vg.example",
           "VARIATIONS_GATEWAY_METRICS_TOKEN_SHA256": "d" * 64,
           "VARIATIONS_GATEWAY_TLS_CERT": str(certs.cert),
           "VARIATIONS_GATEWAY_TLS_KEY": str(certs.key)}
    cfg = parse_config((DEPLOY / "container.yaml").read_text(), env)
    assert cfg.metrics.token_sha256 == "d" * 64 and cfg.server.tls
    # /metrics names members: the image does not EXPOSE its port.
    exposed = re.findall(r"^EXPOSE (.*)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert exposed == ["8080"]
