"""``variations-gateway healthcheck`` follows the config's port and TLS."""

from __future__ import annotations

from pathlib import Path

import yaml
from support import GatewayProcess, base_config, free_port, start_gateway
from tls_certs import make_test_ca

from gateway.cli import main as cli_main
from gateway.config import parse_config
from gateway.healthcheck import target


def _config_of(g: GatewayProcess) -> str:
    return str(g.config_path)


def test_it_follows_the_configs_port_and_says_when_nobody_answers(
        tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    g = start_gateway(base_config(tmp_path), tmp_path)
    try:
        assert cli_main(["healthcheck", "--config", _config_of(g)]) == 0
    finally:
        g.stop()
    assert cli_main(["healthcheck", "--config", _config_of(g)]) == 1
    err = capsys.readouterr().err
    assert "unhealthy" in err and "/healthz did not answer" in err


def test_a_port_given_to_serve_is_given_to_the_check(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    nobody = free_port()
    assert cli_main(["healthcheck", "--config", str(path), "--port", str(nobody)]) == 1


def test_tls_and_wildcard_hosts_become_a_loopback_https_url(tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "ca")
    cfg = parse_config(yaml.safe_dump({
        "server": {"host": "0.0.0.0", "port": 9443, "tls_cert": str(ca.cert),
                   "tls_key": str(ca.key), "public_base_url": "https://vg.example"},
        "metrics": {"port": 9464}}), env={})
    assert target(cfg) == "https://127.0.0.1:9443/healthz"
    assert target(cfg, "::", 9000) == "https://[::1]:9000/healthz"


def test_an_https_gateway_with_a_private_ca_is_healthy(tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "ca")
    raw = base_config(tmp_path, server={"tls_cert": str(ca.cert), "tls_key": str(ca.key)})
    g = start_gateway(raw, tmp_path, ca_file=ca.ca)
    try:
        assert cli_main(["healthcheck", "--config", _config_of(g)]) == 0
    finally:
        g.stop()
