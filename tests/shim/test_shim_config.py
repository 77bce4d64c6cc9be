"""Settings of ``platform shim``: layering, the PLATFORM_SHIM_ prefix, refusals."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from challenge_shim.config import ShimConfig, shim_environ
from platform_common import config as cfg
from tests.shim.support import TOKEN, VENV_BIN


def load(argv: list[str], environ: dict[str, str]) -> ShimConfig:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, ShimConfig)
    return cfg.load(ShimConfig, parser.parse_args(argv), environ=shim_environ(environ))


def test_only_shim_variables_are_read_and_flags_win(tmp_path: Path) -> None:
    config_file = tmp_path / "shim.toml"
    config_file.write_text('[shim]\nslug = "from-file"\nmax_entries = 10\nmax_deadline = 4.5\n')
    environ = {
        "PLATFORM_SHIM_CONFIG": str(config_file),
        "PLATFORM_SHIM_MAX_ENTRIES": "20",
        "PLATFORM_SHIM_CHALLENGE_TOKEN": TOKEN,
        # The master's settings in the same environment are not the shim's.
        "PLATFORM_LISTEN": "0.0.0.0:1",
        "PLATFORM_MAX_DEADLINE": "99",
    }
    config = load(["--max-entries", "30"], environ)
    assert config.slug == "from-file"
    assert config.max_entries == 30
    assert config.max_deadline == 4.5
    assert config.listen == "127.0.0.1:50061"
    assert config.token_value() == TOKEN
    config.check()


def test_token_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    config = load(["--slug", "s", "--challenge-token-file", str(path)], {})
    assert config.token_value() == TOKEN


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--slug", "s"], {}, "no challenge token: set PLATFORM_SHIM_CHALLENGE_TOKEN"),
        (
            ["--slug", "s"],
            {"PLATFORM_SHIM_CHALLENGE_TOKEN": "short"},
            "PLATFORM_SHIM_CHALLENGE_TOKEN: the challenge token must be at least 16 characters",
        ),
        ([], {"PLATFORM_SHIM_CHALLENGE_TOKEN": TOKEN}, "--slug: required"),
        (["--slug", "Bad_Slug"], {"PLATFORM_SHIM_CHALLENGE_TOKEN": TOKEN}, "--slug: lowercase"),
        (
            ["--slug", "s", "--max-deadline", "0"],
            {"PLATFORM_SHIM_CHALLENGE_TOKEN": TOKEN},
            "--max-deadline: must be positive; got 0.0",
        ),
        (
            ["--slug", "s", "--max-entries", "0"],
            {"PLATFORM_SHIM_CHALLENGE_TOKEN": TOKEN},
            "--max-entries: must be 1..4294967295; got 0",
        ),
        (
            ["--slug", "s", "--master-address", "10.0.0.1:50051", "--broker-listen", "0.0.0.0:1"],
            {"PLATFORM_SHIM_CHALLENGE_TOKEN": TOKEN},
            "--broker-listen: the broker door serves only the challenge in the same pod",
        ),
        (
            ["--slug", "s", "--challenge-address", "nowhere"],
            {"PLATFORM_SHIM_CHALLENGE_TOKEN": TOKEN},
            "--challenge-address: expected HOST:PORT",
        ),
    ],
)
def test_refused_settings(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        load(argv, environ).check()
    assert str(info.value).startswith(message)


def test_the_command_refuses_bad_settings_with_exit_code_2() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "platform"), "shim", "--slug", "s"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "platform shim: no challenge token" in result.stderr


def test_help_names_the_shim_variables() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "platform"), "shim", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "1000"},  # one line per option
    )
    assert "(env PLATFORM_SHIM_LISTEN;" in result.stdout
    assert "PLATFORM_SHIM_CHALLENGE_TOKEN: the challenge's token" in result.stdout
    assert "(env PLATFORM_LISTEN" not in result.stdout
