"""Config loading: typing, env interpolation, line-numbered errors, masking, defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import ConfigError, dump_config, load_config, parse_config

HEX = "a" * 64


def test_builtin_defaults_run_procedural_without_auth() -> None:
    cfg = load_config(None, env={})
    assert cfg.auth.mode == "none"
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8080
    assert [b.kind for b in cfg.backends] == ["procedural"] and cfg.route == ("local",)


def test_env_var_chooses_the_file(tmp_path: Path) -> None:
    p = tmp_path / "g.yaml"
    p.write_text("server: {port: 9999}\nauth: {mode: none}\n")
    assert load_config(None, env={"VARIATIONS_GATEWAY_CONFIG": str(p)}).server.port == 9999


def test_interpolation_keeps_types_and_defaults() -> None:
    cfg = parse_config(
        "server:\n  port: ${PORT:-8081}\n  public_base_url: ${BASE}\n"
        "images: {signing_key: '${KEY:-}'}\nauth: {mode: none}\n",
        env={"BASE": "https://vg.example"})
    assert cfg.server.port == 8081 and isinstance(cfg.server.port, int)
    assert cfg.server.public_base_url == "https://vg.example"
    assert cfg.images.signing_key == ""


def test_missing_env_var_is_an_error_with_its_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("auth: {mode: none}\nserver:\n  public_base_url: ${NOPE}\n", env={})
    assert "line 3" in str(info.value) and "NOPE" in str(info.value)


def test_required_env_var_says_the_advice_the_config_gives() -> None:
    """``${NAME:?advice}``: the shipped container config says what to set or mount."""
    text = "auth: {mode: none}\nserver:\n  public_base_url: '${BASE:?set BASE or mount one}'\n"
    for env in ({}, {"BASE": ""}):
        with pytest.raises(ConfigError) as info:
            parse_config(text, env=env)
        assert str(info.value) == ("line 3: server.public_base_url: BASE is not set: "
                                   "set BASE or mount one")
    cfg = parse_config(text, env={"BASE": "https://vg.example"})
    assert cfg.server.public_base_url == "https://vg.example"


@pytest.mark.parametrize("form", ["${KEY-}", "${KEY?say}", "${KEY:=x}", "${KEY:+x}",
                                  "${}", "pre${KEY-}post"])
def test_a_substitution_form_the_loader_does_not_know_is_refused(form: str) -> None:
    """Shell forms without ``:`` stayed literal text: ``signing_key: "${KEY-}"`` signed
    every URL with a key printed in the docs."""
    text = f"auth: {{mode: none}}\nimages:\n  signing_key: '{form}'\n"
    for env in ({}, {"KEY": "k" * 40}):
        with pytest.raises(ConfigError) as info:
            parse_config(text, env=env)
        message = str(info.value)
        assert message.startswith("line 3: images.signing_key: ${"), message
        assert ("is not a substitution this loader knows (it would stay as literal text): "
                "use ${NAME}, ${NAME:-default} or ${NAME:?what to do}") in message
    # A value that holds "${" itself comes from the environment and is kept as it is.
    cfg = parse_config("auth: {mode: none}\nimages: {signing_key: '${KEY}'}\n",
                       env={"KEY": "${" + "k" * 40})
    assert cfg.images.signing_key == "${" + "k" * 40


def test_a_short_signing_key_is_refused_unshown() -> None:
    text = "auth: {mode: none}\nimages:\n  signing_key: '${KEY:-}'\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={"KEY": "hunter2-short-key"})
    message = str(info.value)
    assert message.startswith("line 3: images.signing_key: is 17 characters long; a "
                              "signing key needs at least 32"), message
    assert "openssl rand -hex 32" in message and "hunter2" not in message
    assert parse_config(text, env={"KEY": "f" * 64}).images.signing_key == "f" * 64
    assert parse_config(text, env={}).images.signing_key == ""  # generated and kept


def test_members_from_one_string_as_an_env_var_gives_them() -> None:
    text = "auth: {mode: tokens}\nquota_defaults: {images_per_day: 7}\nusers: ${MEMBERS}\n"
    cfg = parse_config(text, env={"MEMBERS": f"alice={HEX}, bob.b={'B' * 64}\n"})
    assert {n: u.token_sha256 for n, u in cfg.users.items()} == {
        "alice": HEX, "bob.b": "b" * 64}
    assert cfg.users["bob.b"].quota.images_per_day == 7
    # Each entry is checked like a mapping's; the message never shows the value.
    for bad, fragment in ((f"alice:{HEX}", "entry 1 is not name=<token sha256>"),
                          ("alice=vg-plain-token", "users.alice.token_sha256: must be 64"),
                          (f"al ice={HEX}", "entry 1 is not"),
                          (f"alice={HEX},alice2={HEX}", "the same token hash")):
        with pytest.raises(ConfigError) as info:
            parse_config(text, env={"MEMBERS": bad})
        assert fragment in str(info.value) and "vg-plain" not in str(info.value)
        assert "line 3" in str(info.value)


def test_a_string_of_members_refuses_duplicates_emptiness_and_pasted_tokens() -> None:
    text = "auth: {mode: tokens}\nusers: '${MEMBERS:?set MEMBERS}'\n"
    token = "vg-Zq8pasted-secret-token"
    for bad, fragment in ((f"a={HEX},a={'b' * 64}", "entry 2 names 'a' again: each member "
                                                    "once"),
                          (" , ,", "the string of users holds no entry (only spaces or "
                                   "commas)"),
                          (f"alice={HEX}, {token}={'b' * 64}",
                           "entry 2's name looks like a token (it starts with vg-)")):
        with pytest.raises(ConfigError) as info:
            parse_config(text, env={"MEMBERS": bad})
        assert str(info.value).startswith("line 2: users: "), info.value
        assert fragment in str(info.value) and "pasted" not in str(info.value)


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("auth: {mode: none}\nquota_defaults:\n  images_per_dya: 3\n", 3,
     "quota_defaults.images_per_dya: unknown key"),
    ("auth: {mode: none}\nserver:\n  port: eighty\n", 3, "server.port: expected an integer"),
    ("auth: {mode: maybe}\n", 1, "auth.mode: must be one of"),
    ("auth: {mode: tokens}\nusers:\n  alice: {token_sha256: nothex}\n", 3,
     "users.alice.token_sha256"),
    ("auth: {mode: none}\nbackends:\n  - {name: a, kind: dalle}\n", 3, "unknown kind"),
    ("auth: {mode: none}\nbackends:\n  - {name: a, kind: procedural}\nroute: [b]\n", 4,
     "route[0]: no backend named 'b'"),
    ("auth: {mode: none}\nstate: {kind: redis}\n", 2, "needs state.redis_url"),
    ("server: [1, 2\n", 1, "invalid YAML"),  # where the bracket opens, not end of file
    # The admin API refused these names but the config took them: "anonymous" then shared
    # the no-auth caller's metrics label and audit value.
    (f"auth: {{mode: tokens}}\nusers:\n  anonymous: {{token_sha256: {'a' * 64}}}\n", 3,
     "'anonymous' is reserved"),
])
def test_errors_name_the_key_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert f"line {line}" in str(info.value)
    assert fragment in str(info.value)


def test_user_quota_falls_back_to_defaults_per_key() -> None:
    cfg = parse_config(
        f"auth: {{mode: tokens}}\nquota_defaults: {{images_per_day: 10, max_concurrent: 3}}\n"
        f"users:\n  alice: {{token_sha256: {HEX}, quota: {{images_per_day: null}}}}\n", env={})
    q = cfg.users["alice"].quota
    assert q.images_per_day is None and q.max_concurrent == 3
    assert cfg.quota_for("stranger").images_per_day == 10


def test_tokens_mode_requires_every_user_to_have_a_token() -> None:
    with pytest.raises(ConfigError, match="needs token_sha256"):
        parse_config("auth: {mode: tokens}\nusers:\n  alice: {}\n", env={})


def test_dump_masks_secrets() -> None:
    cfg = parse_config(
        "auth: {mode: none}\nimages: {signing_key: supersecret-0123456789abcdef012345}\n"
        "state: {kind: redis, redis_url: 'redis://:hunter2@redis:6379/0'}\n", env={})
    text = dump_config(cfg)
    assert "supersecret" not in text and "hunter2" not in text
    assert "redis://:***@redis:6379/0" in text

    cfg = parse_config(
        "backends:\n"
        "  - {name: sd, kind: sdwebui, base_url: 'https://tok-SECRET@sd.internal:7860'}\n"
        "  - {name: up, kind: openai, model: sd-xl, base_url: 'https://h.example/v1?api-key=SECRET2&x=1'}\n",
        env={})
    text = dump_config(cfg)
    assert "SECRET" not in text
    assert "https://***@sd.internal:7860" in text
    assert "https://h.example/v1?api-key=***&x=1" in text


def test_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1]
    for name in ("gateway.yaml", "gateway.example.yaml"):
        load_config(root / "config" / name, env={"UPSTREAM_API_KEY": "x", "SD_PASSWORD": "x"})


def test_the_example_config_names_every_backend_option() -> None:
    """The README says config/gateway.example.yaml lists every option: each backend
    kind's own options appear in its entry (live, or commented out), and the options
    every kind shares appear once."""
    import dataclasses

    from gateway import backends
    from gateway.backends.base import BackendOptions

    text = (Path(__file__).resolve().parents[1] / "config" / "gateway.example.yaml"
            ).read_text()
    entries = re.split(r"^\s*#?\s*- name:", text, flags=re.M)[1:]
    shared = {f.name for f in dataclasses.fields(BackendOptions)}

    def names(block: str, option: str) -> bool:
        return re.search(rf"^\s*#?\s*{option}:", block, re.M) is not None

    for kind in backends.KINDS:
        (entry,) = [e for e in entries if re.search(rf"kind: {kind}\b", e)]
        for f in dataclasses.fields(backends.options_class(kind)):
            where = text if f.name in shared else entry
            assert names(where, f.name), (kind, f.name)


@pytest.mark.parametrize("key", ["window_seconds", "distinct_end_users", "limit_hits"])
def test_abuse_thresholds_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError, match="must be at least 1"):
        parse_config(f"auth: {{mode: none}}\nabuse: {{{key}: 0}}\n")


def test_header_values_lose_surrounding_whitespace() -> None:
    """A key read from a secret file or an env var often ends in a newline, which made
    every upstream request fail on an invalid header while /readyz said ready."""
    cfg = parse_config(
        "auth: {mode: none}\nbackends:\n"
        "  - {name: up, kind: openai, model: m, base_url: 'http://u/v1', api_key: '${KEY}',\n"
        "     organization: ' org-1 ', project: \"proj\\t\"}\n"
        "  - {name: sd, kind: sdwebui, base_url: 'http://s', username: \"art\\n\",\n"
        "     password: '${PW}'}\n",
        env={"KEY": "sk-secret-123\n", "PW": "  hunter2\r\n"})
    up, sd = (b.options for b in cfg.backends)
    assert (up.api_key, up.organization, up.project) == ("sk-secret-123", "org-1", "proj")
    assert (sd.username, sd.password) == ("art", "hunter2")


@pytest.mark.parametrize("inner", ["sk-abc\ndef", "sk-abc\rdef", "sk-abc\x00def",
                                   "sk-abc\tdef", "sk-abc\x7fdef"])
def test_a_key_with_a_control_character_inside_is_refused_without_showing_it(
        inner: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("auth: {mode: none}\nbackends:\n"
                     "  - name: up\n    kind: openai\n    model: m\n    base_url: 'http://u/v1'\n"
                     "    api_key: '${KEY}'\n", env={"KEY": inner})
    message = str(info.value)
    assert "line 7" in message and "backends[0].api_key" in message
    assert "control character" in message
    assert "sk-abc" not in message and "def" not in message


# --------------------------------------------------------------------------- exposure

EXPOSED = "auth: {mode: tokens, admin_token_sha256: '%s'}\nserver: {host: %s%s}\n%s"


def _exposed(host: str = "0.0.0.0", server: str = "", rest: str = ""):  # type: ignore[no-untyped-def]
    return parse_config(EXPOSED % (HEX, host, server, rest), env={})


def test_beyond_loopback_image_urls_need_a_base_url_or_allowed_hosts() -> None:
    """Issue 19, item 10: else a client's Host header mints the URLs."""
    for host in ("0.0.0.0", "192.168.1.20", "'::'", "gateway.lan"):
        with pytest.raises(ConfigError) as info:
            _exposed(host, "", f"metrics: {{token_sha256: '{HEX}'}}\n")
        message = str(info.value)
        assert "server.public_base_url" in message and "server.allowed_hosts" in message
        assert "Host header" in message and "line 2" in message
    metrics = "metrics: {port: 9464}\n"
    assert _exposed(server=", public_base_url: 'https://vg.example'", rest=metrics)
    cfg = _exposed(server=", allowed_hosts: [VG.lan, 'vg.lan:8080', '[::1]:8080']",
                   rest=metrics)
    assert cfg.server.allowed_hosts == ("vg.lan", "vg.lan:8080", "[::1]:8080")
    assert cfg.server.host_allowed("vg.LAN") and not cfg.server.host_allowed("evil.example")
    for host in ("127.0.0.1", "'::1'", "localhost", "127.0.0.2"):  # loopback: as before
        assert _exposed(host).server.public_base_url is None


def test_allowed_hosts_entries_are_host_names() -> None:
    for bad in ("https://vg.lan", "vg.lan/path", "vg.lan:port", "*", ""):
        with pytest.raises(ConfigError, match="allowed_hosts"):
            _exposed(server=f", allowed_hosts: ['{bad}']", rest="metrics: {port: 9464}\n")


def test_beyond_loopback_metrics_need_a_token_or_their_own_port() -> None:
    """Issue 19, item 11: /metrics on the API port names members and their spend."""
    base = ", public_base_url: 'https://vg.example'"
    with pytest.raises(ConfigError) as info:
        _exposed(server=base)
    message = str(info.value)
    for key in ("metrics.token_sha256", "metrics.port", "metrics.enabled: false"):
        assert key in message
    assert _exposed(server=base, rest=f"metrics: {{token_sha256: '{HEX}'}}\n")
    assert _exposed(server=base, rest="metrics: {port: 9464}\n")
    assert _exposed(server=base, rest="metrics: {enabled: false}\n")
    assert _exposed("127.0.0.1", base).metrics.token_sha256 is None  # loopback: as before


def test_serve_checks_the_host_it_binds_not_only_the_configs() -> None:
    """``serve --host 0.0.0.0`` on a loopback config is held to the same rules."""
    from gateway.cli import check_bind

    cfg = _exposed("127.0.0.1")
    check_bind(cfg, "127.0.0.1")
    with pytest.raises(ConfigError, match=re.escape("server.allowed_hosts")):
        check_bind(cfg, "0.0.0.0")
    check_bind(_exposed("127.0.0.1", ", public_base_url: 'https://vg.example'",
                        "metrics: {port: 9464}\n"), "0.0.0.0")


@pytest.mark.parametrize(("text", "line"), [
    ("auth: {mode: none}\nserver\n  port: 8080\n", 2),  # a key without its colon
    ("auth: {mode: none}\nimages: {signing_key: \"abc}\nstate: {}\n", 2),  # open quote
    ("auth: {mode: none}\nroute: [local\naudit: {}\n", 2),  # open bracket
    ("auth:\n  mode: none\n server: {}\n", 3),  # a bad indent is where it is noticed
])
def test_yaml_syntax_errors_name_the_line_to_edit(text: str, line: int) -> None:
    """PyYAML notices an unfinished token on the next line (or at the end of the file):
    the error used to name that line, one late."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert str(info.value).startswith(f"line {line}: "), str(info.value)


MEMBERS = "users:\n  alice: {token_sha256: %s}\n  bob: {token_sha256: %s}\n"


def test_members_with_auth_mode_none_are_refused() -> None:
    """add-user's snippet pasted under users: with auth off: any token would get in."""
    with pytest.raises(ConfigError) as info:
        parse_config("auth: {mode: none}\n" + MEMBERS % ("a" * 64, "b" * 64), env={})
    message = str(info.value)
    assert message.startswith("line 1: auth.mode:"), message
    assert "2 member(s)" in message and "set auth.mode: tokens" in message.lower()


def test_two_members_with_one_token_hash_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("auth: {mode: tokens}\n" + MEMBERS % ("a" * 64, "A" * 64), env={})
    assert "line 4: users.bob.token_sha256: the same token hash as users.alice" in str(
        info.value)


def test_a_member_token_equal_to_the_admin_token_is_refused() -> None:
    text = f"auth: {{mode: tokens, admin_token_sha256: {'b' * 64}}}\n" + MEMBERS % (
        "a" * 64, "b" * 64)
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert "users.bob.token_sha256: the admin token's hash" in str(info.value)


def test_relative_paths_follow_the_config_file_not_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started from another directory, the same config used to open empty state, cache
    and audit, and every issued URL broke."""
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "g.yaml").write_text(
        "auth: {mode: none}\nstate: {path: var/state.sqlite3}\ncache: {dir: ../cache}\n"
        "images: {dir: var/images}\naudit: {path: /abs/audit.sqlite3}\n"
        "backends:\n  - {name: c, kind: comfyui, base_url: 'http://gpu:8188',"
        " workflow: wf.json}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../etc/g.yaml", env={})
    assert cfg.state.path == str(conf / "var" / "state.sqlite3")
    assert cfg.cache.dir == str(tmp_path / "cache")
    assert cfg.images.dir == str(conf / "var" / "images")
    assert cfg.audit.path == "/abs/audit.sqlite3"
    assert cfg.backends[0].options.workflow == str(conf / "wf.json")  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_quota_that_is_not_a_finite_number_is_refused(value: str) -> None:
    # NaN compares False with everything: as a budget, the SQLite ledger refused every
    # priced request and Redis's reserve.lua treated it as unlimited.
    with pytest.raises(ConfigError, match=r"line 2: quota_defaults\.budget_usd_per_month: "
                       r"expected a finite number"):
        parse_config(f"quota_defaults:\n  budget_usd_per_month: {value}\n", {})
