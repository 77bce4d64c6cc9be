"""The agent's settings: sources, and the refusals that name the setting."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from platform_common import config as cfg
from platform_common.cli import build_parser
from tests.validator.support import VALIDATOR_KEY, agent_config, master_hotkey, signer
from validator.config import ValidatorConfig
from validator.streams import Backoff

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images.json"


def valid(**overrides: object) -> ValidatorConfig:
    return agent_config(chain="local+file:chain.json", **overrides)


def test_settings_come_from_flags_environment_and_file(tmp_path: Path) -> None:
    path = tmp_path / "validator.toml"
    path.write_text(
        "[validator]\n"
        f'master_hotkey = "{master_hotkey()}"\n'
        'chain = "finney"\n'
        "netuid = 42\n"
        'database_url = "postgresql+asyncpg://validator@db:5432/validator"\n'
    )
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, ValidatorConfig)
    args = parser.parse_args(["--config", str(path), "--netuid", "7"])
    loaded = cfg.load(ValidatorConfig, args, environ={"PLATFORM_CHAIN": "test"})
    assert (loaded.netuid, loaded.chain) == (7, "test")
    assert loaded.database_url.startswith("postgresql+asyncpg://")
    loaded.check()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["validator", "--hotkey", VALIDATOR_KEY], "--hotkey"),
        # A nested subcommand: no prefix of --edge-token-file either.
        (
            [
                "edge",
                "bootstrap",
                "--xds",
                "127.0.0.1:1",
                "--node-id",
                "n",
                "--edge-token",
                "a-secret",
            ],
            "--edge-token",
        ),
    ],
)
def test_a_secret_is_never_taken_for_a_file_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"master_hotkey": ""}, "--master-hotkey: required"),
        ({"master_hotkey": "5notanaddress"}, "--master-hotkey: not a valid SS58 address"),
        ({"chain": ""}, "--chain: required"),
        ({"master": "nowhere"}, "--master: expected HOST:PORT"),
        ({"database_url": "sqlite+aiosqlite:///:memory:"}, "SQLite needs a file path"),
        ({"database_url": "mysql://x/y"}, "unsupported driver 'mysql'"),
        ({"reconnect_max": 0.01}, "--reconnect-max: must be >= --reconnect-min"),
        ({"submit_attempts": 0}, "--submit-attempts: must be at least 1"),
        ({"shutdown_grace": 0.0}, "--shutdown-grace: must be positive"),
        ({"run_challenges": True}, "--runtime-images: required with --run-challenges"),
        (
            {"run_challenges": True, "runtime_images": "no/such/images.json"},
            "--runtime-images: .*no/such/images.json",
        ),
        (
            {"run_challenges": True, "runtime_images": str(IMAGES), "runtime_dir": ""},
            "--runtime-dir: required with --run-challenges",
        ),
    ],
)
def test_unusable_settings_are_refused_by_name(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=message):
        dataclasses.replace(valid(), **overrides).check()  # type: ignore[arg-type]


def test_the_hotkey_comes_from_the_environment_or_a_private_file(tmp_path: Path) -> None:
    assert valid().signer().ss58_address == signer(VALIDATOR_KEY).ss58_address
    key = tmp_path / "hotkey"
    key.write_text(VALIDATOR_KEY + "\n")
    key.chmod(0o600)
    from_file = valid(hotkey="", hotkey_file=str(key)).signer()
    assert from_file.ss58_address == signer(VALIDATOR_KEY).ss58_address
    with pytest.raises(cfg.ConfigError, match="not both"):
        valid(hotkey_file=str(key)).signer()
    with pytest.raises(cfg.ConfigError, match="no hotkey"):
        valid(hotkey="").signer()
    key.chmod(0o604)
    with pytest.raises(cfg.ConfigError, match="give other users access"):
        valid(hotkey="", hotkey_file=str(key)).signer()
    with pytest.raises(cfg.ConfigError, match="PLATFORM_HOTKEY: key: not a valid"):
        valid(hotkey="not a key").signer()


def test_backoff_is_full_jitter_under_a_growing_cap() -> None:
    backoff = Backoff(0.5, 30.0)
    assert backoff.delay(0, rand=lambda: 1.0) == 0.5
    assert backoff.delay(3, rand=lambda: 1.0) == 4.0
    assert backoff.delay(10, rand=lambda: 1.0) == 30.0
    assert backoff.delay(10_000, rand=lambda: 0.5) == 15.0
    assert backoff.delay(2, rand=lambda: 0.0) == 0.0
