"""Layered settings: defaults < config file < environment < flags."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from master.config import MasterConfig
from platform_common import config as cfg


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, MasterConfig)
    return parser.parse_args(list(argv))


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    file = tmp_path / "platform.toml"
    file.write_text(
        '[master]\nlisten = "127.0.0.1:1111"\nbookmark_interval = 5\n'
        'image_allowlist = ["ghcr.io/a", "ghcr.io/b"]\nproduction = true\n'
    )
    env = {"PLATFORM_LISTEN": "127.0.0.1:2222", "PLATFORM_BOOKMARK_INTERVAL": "7.5"}
    loaded = cfg.load(MasterConfig, parse("--config", str(file), "--listen", "127.0.0.1:3333"), env)
    assert loaded.listen == "127.0.0.1:3333"  # flag
    assert loaded.bookmark_interval == 7.5  # env over file
    assert loaded.image_allowlist == ("ghcr.io/a", "ghcr.io/b")  # file
    assert loaded.production is True  # file
    assert loaded.event_retention == 100_000  # default


def test_config_file_from_environment_and_boolean_flags(tmp_path: Path) -> None:
    file = tmp_path / "p.toml"
    file.write_text("[master]\nmigrate = false\n")
    loaded = cfg.load(MasterConfig, parse(), {"PLATFORM_CONFIG": str(file)})
    assert loaded.migrate is False
    assert cfg.load(MasterConfig, parse("--migrate"), {"PLATFORM_CONFIG": str(file)}).migrate


def test_env_lists_are_comma_separated() -> None:
    loaded = cfg.load(MasterConfig, parse(), {"PLATFORM_IMAGE_ALLOWLIST": "ghcr.io/a, quay.io/b"})
    assert loaded.image_allowlist == ("ghcr.io/a", "quay.io/b")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[master]\nlistn = 'x'\n", "unknown setting(s) in [master]: ['listn']"),
        ("[master\n", "is not valid TOML"),
        ("[master]\nevent_retention = true\n", "expected an integer"),
        ("[master]\nlog_format = 'xml'\n", "must be one of json, text"),
    ],
)
def test_bad_config_files_are_refused_naming_the_setting(
    tmp_path: Path, text: str, message: str
) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        cfg.load(MasterConfig, parse("--config", str(file)), {})


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("[::1]:0", "::1", 0),
        ("0.0.0.0:9464", "0.0.0.0", 9464),
    ],
)
def test_host_port_round_trip(text: str, host: str, port: int) -> None:
    assert cfg.parse_host_port(text, "--listen") == (host, port)
    assert cfg.join_host_port(host, port) == text


@pytest.mark.parametrize("text", ["50051", ":50051", "host:", "host:65536", "host:-1", "host:x"])
def test_bad_host_port_is_refused(text: str) -> None:
    with pytest.raises(cfg.ConfigError, match="--listen: expected HOST:PORT"):
        cfg.parse_host_port(text, "--listen")


@pytest.mark.parametrize(
    ("url", "backend"),
    [
        ("sqlite+aiosqlite:///platform.db", "sqlite"),
        ("sqlite+aiosqlite:////var/lib/platform/platform.db", "sqlite"),
        ("postgresql+asyncpg://platform:secret@db:5432/platform", "postgresql"),
    ],
)
def test_database_urls_name_their_backend(url: str, backend: str) -> None:
    assert cfg.check_database_url(url) == backend


@pytest.mark.parametrize(
    ("url", "production", "message"),
    [
        ("platform.db", False, "expected DRIVER://...; got 'platform.db'"),
        ("sqlite+aiosqlite://", False, "SQLite needs a file path"),
        ("sqlite+aiosqlite:///:memory:", False, "SQLite needs a file path"),
        ("sqlite+aiosqlite:///:memory:?cache=shared", False, "SQLite needs a file path"),
        ("sqlite+aiosqlite:///platform.db", True, "production mode refuses SQLite"),
        ("postgresql://db/platform", False, "unsupported driver 'postgresql'"),
        ("mysql://x/y", True, "unsupported driver 'mysql'"),
    ],
)
def test_bad_database_urls_are_refused_naming_the_flag(
    url: str, production: bool, message: str
) -> None:
    with pytest.raises(cfg.ConfigError, match=f"^--database-url: .*{re.escape(message)}"):
        cfg.check_database_url(url, production=production)


def test_missing_config_file_is_named() -> None:
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load(MasterConfig, parse("--config", "/nonexistent/p.toml"), {})


def test_admin_token_sources(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-0123456789\n")
    assert MasterConfig(admin_token_file=str(token_file)).admin_token_value() == (
        "file-token-0123456789"
    )
    assert MasterConfig(admin_token="env-token-0123456789").admin_token_value() == (
        "env-token-0123456789"
    )
    with pytest.raises(cfg.ConfigError, match="not both"):
        MasterConfig(admin_token="a" * 20, admin_token_file=str(token_file)).admin_token_value()
    assert MasterConfig(admin_token="env-token-0123456789\n").admin_token_value() == (
        "env-token-0123456789"
    )
    with pytest.raises(cfg.ConfigError, match="must not contain whitespace"):
        MasterConfig(admin_token="env token 0123456789").admin_token_value()
    with pytest.raises(cfg.ConfigError, match="no admin token"):
        MasterConfig().admin_token_value()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(cfg.ConfigError, match="is empty"):
        MasterConfig(admin_token_file=str(tmp_path / "empty")).admin_token_value()


def test_the_operators_guide_sample_config_loads_and_checks(tmp_path: Path) -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "operators.md").read_text()
    [sample] = re.findall(r"```toml\n(.*?)```", guide, re.S)
    file = tmp_path / "master.toml"
    file.write_text(sample)
    loaded = cfg.load(MasterConfig, parse("--config", str(file)), {})
    loaded.check()
    assert loaded.production is True
    assert loaded.image_allowlist == ("ghcr.io/example-org", "registry.example.org/challenges")
    # The documented precedence: env beats the file, a flag beats both.
    env = {"PLATFORM_LOG_LEVEL": "debug", "PLATFORM_LOG_FORMAT": "text"}
    assert cfg.load(MasterConfig, parse("--config", str(file)), env).log_level == "debug"
    flagged = cfg.load(MasterConfig, parse("--config", str(file), "--log-format", "json"), env)
    assert flagged.log_format == "json"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--edge-envoy",), "--edge-envoy needs --edge-listen"),
        (("--edge-rate-per-ip", "0"), "--edge-rate-per-ip: must be at least 1"),
        (("--edge-authz-rate-per-ip", "0"), "--edge-authz-rate-per-ip: must be at least 1"),
        (("--edge-timeout", "0"), "--edge-timeout: must be 1..3600 seconds"),
        (("--edge-max-connections", "0"), "--edge-max-connections: must be an integer of at "),
        (
            ("--edge-max-heap-bytes", str(64 * 1024 * 1024 - 1)),
            "--edge-max-heap-bytes: must be an integer of at least 67108864 (64 MiB); got 67108863",
        ),
        (("--edge-trusted-proxies", "-1"), "--edge-trusted-proxies: must be 0..10"),
        (("--edge-trusted-proxies", "11"), "--edge-trusted-proxies: must be 0..10"),
        (("--edge-tls-cert", "/etc/edge.crt"), "--edge-tls-key: required with the other"),
        (("--edge-tls-key", "/etc/edge.key"), "--edge-tls-cert: required with the other"),
        (
            ("--edge-tls-cert", "edge.crt", "--edge-tls-key", "/etc/edge.key"),
            "--edge-tls-cert: must be an absolute path (Envoy's); got 'edge.crt'",
        ),
        (
            ("--edge-tls-cert", "/no/such/edge.crt", "--edge-tls-key", "/no/such/edge.key"),
            "--edge-tls-cert: cannot read /no/such/edge.crt",
        ),
    ],
)
def test_bad_edge_settings_are_refused_naming_the_flag(argv: tuple[str, ...], message: str) -> None:
    edge = () if "--edge-envoy" in argv else ("--edge-listen", "127.0.0.1:8080", "--edge-envoy")
    loaded = cfg.load(MasterConfig, parse(*edge, *argv), {"PLATFORM_ADMIN_TOKEN": "t" * 32})
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        loaded.check()


def test_a_separate_envoys_certificate_is_not_looked_for_here() -> None:
    """Without --edge-envoy the paths are on Envoy's filesystem, not this one."""
    argv = ["--edge-listen", "0.0.0.0:443", "--edge-tls-cert", "/tls/edge.crt"]
    argv += ["--edge-tls-key", "/tls/edge.key"]
    env = {"PLATFORM_ADMIN_TOKEN": "t" * 32, "PLATFORM_EDGE_TOKEN": "e" * 32}
    loaded = cfg.load(MasterConfig, parse(*argv), env)
    loaded.check()
    assert (loaded.edge_tls_cert, loaded.edge_tls_key) == ("/tls/edge.crt", "/tls/edge.key")


def test_edge_trusted_proxies_from_the_environment() -> None:
    env = {"PLATFORM_EDGE_TRUSTED_PROXIES": "2"}
    assert cfg.load(MasterConfig, parse(), env).edge_trusted_proxies == 2
    assert cfg.load(MasterConfig, parse(), {}).edge_trusted_proxies == 0
