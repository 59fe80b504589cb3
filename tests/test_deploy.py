"""The deployment files (issue 7): each is checked by a real tool where one runs here.

systemd-analyze verifies the unit; kubernetes-validate checks the manifests against the
Kubernetes schemas; hadolint lints the Dockerfile; nginx -t checks nginx.conf; the
compose file is parsed and its wiring checked; every embedded gateway config must load.
A deliberately broken copy of each file must fail the same tool, so no check is vacuous.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import build_wheel

from gateway.config import parse_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "systemd" / "variations-gateway.service"
KUBE = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
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
                      "StateDirectory=variations-gateway", "NoNewPrivileges=yes"):
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
    result = run(validator, "--strict", *map(str, KUBE))
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {d["kind"]: d for p in KUBE for d in _docs(p)}
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


def test_the_configmap_holds_a_valid_redis_gateway_config() -> None:
    (cm,) = _docs(DEPLOY / "kubernetes" / "configmap.yaml")
    config = parse_config(cm["data"]["gateway.yaml"], ENV)
    assert config.state.kind == "redis" and config.audit.stdout
    assert config.state.redis_url == "redis://variations-gateway-redis:6379/0"


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
    docker = shutil.which("docker")
    if docker and run(docker, "compose", "version").returncode == 0:
        env_args = [f"{k}={v}" for k, v in ENV.items()]
        result = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"),
                                 "config", "--quiet"], capture_output=True, text=True,
                                env={**dict(a.split("=", 1) for a in env_args),
                                     "PATH": "/usr/bin:/bin"}, timeout=60)
        assert result.returncode == 0, result.stderr


def test_nginx_conf_parses(tmp_path: Path) -> None:
    nginx = tool("nginx")
    # nginx -t resolves upstream names: point the compose service name at loopback.
    conf = tmp_path / "nginx.conf"
    conf.write_text((DEPLOY / "nginx.conf").read_text()
                    .replace("variations-gateway:8080", "127.0.0.1:8080"))
    result = run(nginx, "-t", "-c", str(conf), "-p", str(tmp_path), "-e", "/dev/stderr")
    assert result.returncode == 0, result.stderr


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
    assert 'VOLUME ["/etc/variations-gateway", "/var/lib/variations-gateway"]' in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("WORKDIR /src", "RUN cd /src"))
    assert run(hadolint, "--no-color", str(broken)).returncode != 0
