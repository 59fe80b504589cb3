"""Issue 19, item 9: the gateway serves https itself (``server.tls_cert`` /
``server.tls_key``), and warns when it listens beyond loopback over plain http.

A real ``serve`` process with a certificate from a throw-away CA (tests/tls_certs.py) is
called by the official openai SDK and by the GIMP plug-in's client, as members would.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from support import (
    TOKENS,
    GatewayProcess,
    base_config,
    free_port,
    png_bytes,
    start_gateway,
    wait_http,
)
from tls_certs import TestCA, make_test_ca

from gateway.cli import main as cli_main
from gateway.cli import plain_http_warning
from gateway.config import ConfigError, build_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins" / "gimp" / "generate-variations"))

import vg_client  # noqa: E402

# What a gateway beyond loopback must set anyway (issue 19, items 10 and 11): where its
# image URLs point, and /metrics kept off the open API port.
EXPOSED_SERVER = {"public_base_url": "https://variations.example.com"}
EXPOSED = {"metrics": {"enabled": True, "port": None, "token_sha256": "0" * 64}}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def https_gateway(ca: TestCA, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[GatewayProcess, int]]:
    """One https gateway (and its https metrics port) for the tests that call it."""
    tmp = tmp_path_factory.mktemp("gw-tls")
    metrics_port = free_port()
    raw = base_config(tmp, server={"tls_cert": str(ca.cert), "tls_key": str(ca.key)},
                      metrics={"enabled": True, "port": metrics_port})
    g = start_gateway(raw, tmp, ca_file=ca.ca)
    try:
        yield g, metrics_port
    finally:
        g.stop()


def tls_section(ca: TestCA) -> dict[str, str]:
    return {"tls_cert": str(ca.cert), "tls_key": str(ca.key)}


# ------------------------------------------------------------------ a real process


def test_the_openai_sdk_creates_and_downloads_over_https(
        https_gateway: tuple[GatewayProcess, int], ca: TestCA) -> None:
    """The minted URL is https (public_base_url unset) and downloads through the same
    verified client; the start-up lines give https URLs."""
    g, _ = https_gateway
    assert g.url.startswith("https://127.0.0.1:")
    http = openai.DefaultHttpxClient(verify=ca.client_context())
    client = openai.OpenAI(base_url=g.url + "/v1", api_key=TOKENS["alice"], max_retries=0,
                           http_client=http)
    resp = client.images.create_variation(image=("a.png", png_bytes(64)), size="256x256",
                                          n=2, response_format="url")
    assert len(resp.data) == 2
    for item in resp.data:
        assert item.url is not None
        assert item.url.startswith(g.url + "/v1/images/files/")
        got = http.get(item.url)
        assert got.status_code == 200
        assert got.content.startswith(b"\x89PNG")
    log = g.log()
    assert f"listening on https://127.0.0.1:{g.url.rsplit(':', 1)[1]}" in log
    assert f"Gateway URL: {g.url}" in log
    assert "plain http" not in log  # loopback: no warning


def test_plain_http_and_an_untrusted_client_are_refused(
        https_gateway: tuple[GatewayProcess, int]) -> None:
    """TLS is the only way in: http:// to the same port gets no answer, and a client that
    does not trust the CA fails verification before sending anything."""
    g, _ = https_gateway
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)) as info:
        urllib.request.urlopen(g.url.replace("https://", "http://") + "/healthz", timeout=5)
    assert not isinstance(info.value, urllib.error.HTTPError)
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen(g.url + "/healthz", timeout=5,
                               context=ssl.create_default_context())  # system CAs
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)


def test_the_metrics_port_speaks_the_same_tls(https_gateway: tuple[GatewayProcess, int],
                                              ca: TestCA) -> None:
    """/metrics names members and their spend: its own port is https too."""
    _, port = https_gateway
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5,
                                context=ca.client_context()) as r:
        assert r.status == 200
        assert b"# TYPE" in r.read()


def test_the_plugin_client_with_and_without_the_ca_file(
        https_gateway: tuple[GatewayProcess, int], ca: TestCA) -> None:
    """The acceptance line: the plug-in works against an https gateway with a private CA
    set in ``ca_file``; without it, the 'not trusted' sentence."""
    g, _ = https_gateway
    with pytest.raises(vg_client.GatewayError) as info:
        vg_client.get_usage(g.url, TOKENS["alice"], timeout=10)
    assert info.value.kind == "untrusted"
    assert "the certificate is not trusted: add your studio's CA file in Settings" \
        in str(info.value)

    usage = vg_client.get_usage(g.url, TOKENS["alice"], timeout=10, ca_file=str(ca.ca))
    assert usage["user"] == "alice"
    res = vg_client.request_variations(g.url, TOKENS["alice"], png_bytes(64, seed=3), n=1,
                                       size="256x256", timeout=30, ca_file=str(ca.ca))
    assert len(res.images) == 1
    assert res.images[0].startswith(b"\x89PNG")


def test_beyond_loopback_over_plain_http_the_log_warns(tmp_path: Path) -> None:
    """Binding 0.0.0.0 without TLS: a warning naming both settings and the proxy."""
    raw = base_config(tmp_path, server={"host": "0.0.0.0", **EXPOSED_SERVER}, **EXPOSED)
    g = start_gateway(raw, tmp_path)
    try:
        log = g.log()
    finally:
        g.stop()
    assert "plain_http_beyond_loopback" in log  # the structlog event
    line = next(x for x in log.splitlines() if x.startswith("variations-gateway: warning:"))
    assert "server.tls_cert" in line and "server.tls_key" in line
    assert "reverse proxy with TLS in front (deploy/nginx.conf)" in line


def test_beyond_loopback_with_tls_there_is_no_warning(ca: TestCA, tmp_path: Path) -> None:
    port = free_port()
    raw = base_config(tmp_path, server={"host": "0.0.0.0", **EXPOSED_SERVER, **tls_section(ca)},
                      **EXPOSED)
    g = start_gateway(raw, tmp_path, port=port, ca_file=ca.ca)
    try:
        wait_http(f"https://127.0.0.1:{port}/healthz", context=ca.client_context())
        log = g.log()
    finally:
        g.stop()
    assert "listening on https://0.0.0.0:" in log
    assert "warning" not in log.lower()


# ------------------------------------------------------------------ when it warns


@pytest.mark.parametrize(("host", "server", "warns"), [
    ("0.0.0.0", {}, True),
    ("::", {}, True),
    ("192.0.2.10", {}, True),
    ("127.0.0.1", {}, False),
    ("localhost", {}, False),
    ("::1", {}, False),
    # a proxy declared in front (deploy/compose.yaml, Kubernetes) is where TLS ends
    ("0.0.0.0", {"trusted_proxies": ["10.0.0.0/8"]}, False),
])
def test_which_binds_warn(host: str, server: dict[str, object], warns: bool,
                          tmp_path: Path) -> None:
    cfg = build_config(base_config(tmp_path, server=server))
    warning = plain_http_warning(cfg, host)
    assert (warning is not None) == warns
    if warning:
        assert "server.tls_cert" in warning and "server.tls_key" in warning
        assert "reverse proxy" in warning


def test_check_config_warns_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.yaml"
    raw = base_config(tmp_path, server={"host": "0.0.0.0", **EXPOSED_SERVER}, **EXPOSED)
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "# warning: listening on 0.0.0.0 over plain http" in err


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("given", ["tls_cert", "tls_key"])
def test_one_of_the_two_alone_is_refused(given: str, ca: TestCA, tmp_path: Path) -> None:
    other = "tls_key" if given == "tls_cert" else "tls_cert"
    text = yaml.safe_dump(base_config(tmp_path, server={given: str(ca.cert)}),
                          sort_keys=False)
    with pytest.raises(ConfigError) as info:
        parse_config(text, {})
    assert info.value.path == f"server.{other}"
    assert "set both server.tls_cert and server.tls_key" in str(info.value)
    assert info.value.line is not None  # points into the server section


def test_empty_values_mean_no_tls(tmp_path: Path) -> None:
    """``tls_cert: ${TLS_CERT:-}`` with the variable unset is plain http, not an error."""
    cfg = build_config(base_config(tmp_path, server={"tls_cert": "", "tls_key": ""}))
    assert not cfg.server.tls


def test_both_load(ca: TestCA, tmp_path: Path) -> None:
    cfg = build_config(base_config(tmp_path, server=tls_section(ca)))
    assert cfg.server.tls


def _encrypted_key(ca: TestCA, tmp_path: Path) -> Path:
    out = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(ca.key), "-out", str(out), "-aes256",
                    "-passout", "pass:secret"], check=True, capture_output=True, timeout=60)
    return out


@pytest.mark.parametrize(("case", "setting", "says"), [
    ("missing cert", "server.tls_cert", "cannot read"),
    ("missing key", "server.tls_key", "cannot read"),
    ("cert is not PEM", "server.tls_cert", "is not a PEM certificate"),
    ("key is a certificate", "server.tls_key", "is not a PEM private key"),
    ("key of another certificate", "server.tls_key", "does not belong to the certificate"),
    ("encrypted key", "server.tls_key", "protected by a passphrase"),
])
def test_files_that_cannot_be_served_name_the_setting(
        case: str, setting: str, says: str, ca: TestCA, tmp_path: Path) -> None:
    """Checked when the config loads (serve and check-config), never a prompt on the
    terminal for a passphrase."""
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    cert, key = {
        "missing cert": lambda: (tmp_path / "nope.pem", ca.key),
        "missing key": lambda: (ca.cert, tmp_path / "nope.key"),
        "cert is not PEM": lambda: (junk, ca.key),
        "key is a certificate": lambda: (ca.cert, ca.ca),
        "key of another certificate": lambda: (ca.cert, make_test_ca(tmp_path / "o").key),
        "encrypted key": lambda: (ca.cert, _encrypted_key(ca, tmp_path)),
    }[case]()
    with pytest.raises(ConfigError) as info:
        build_config(base_config(tmp_path, server={"tls_cert": str(cert),
                                                   "tls_key": str(key)}))
    assert info.value.path == setting
    assert says in str(info.value)


def test_serve_refuses_a_bad_pair_with_a_config_error(ca: TestCA, tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(base_config(
        tmp_path, server={"tls_cert": str(ca.cert), "tls_key": str(tmp_path / "x.key")})))
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert "config error" in out.stderr and "server.tls_key: cannot read" in out.stderr


def test_the_example_config_names_every_server_option() -> None:
    """config/gateway.example.yaml lists every option: each ``server`` setting (the TLS
    pair included) appears in its ``server:`` section."""
    import dataclasses

    from gateway.config import ServerConfig

    text = (ROOT / "config" / "gateway.example.yaml").read_text()
    section = text.split("\nserver:\n", 1)[1].split("\n\n", 1)[0]
    for f in dataclasses.fields(ServerConfig):
        assert f"\n  {f.name}:" in "\n" + section, f.name
