"""Settings of ``platform shim``: flags > ``PLATFORM_SHIM_*`` environment > ``[shim]`` in a
TOML file (``--config`` or ``PLATFORM_SHIM_CONFIG``) > defaults.

The shim reads only ``PLATFORM_SHIM_*`` variables, never the master's ``PLATFORM_*``
ones: a local runtime may start shims from an environment that holds the master's.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from platform_common.answers import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_RESPONSE_BYTES, Limits
from platform_common.config import ENV_PREFIX, ConfigError, parse_host_port, secret_token, setting

SHIM_ENV_PREFIX = ENV_PREFIX + "SHIM_"
TOKEN_MIN = 16
SLUG_MAX = 40
_SLUG_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# ShimInfo.max_entries is a uint32; gRPC message sizes are int32.
_MAX_ENTRIES_CEILING = 2**32 - 1
_MAX_BYTES_CEILING = 2**31 - 2


@dataclass(frozen=True)
class ShimConfig:
    SECTION = "shim"

    listen: str = setting(
        "127.0.0.1:50061",
        "gRPC address the master calls (ChallengeInternal, health, reflection); "
        "port 0 picks a free port",
        metavar="HOST:PORT",
    )
    slug: str = setting("", "slug of the challenge this shim fronts (required)", metavar="SLUG")
    challenge_token_file: str = setting(
        "",
        "file holding the challenge's token (alternative to PLATFORM_SHIM_CHALLENGE_TOKEN)",
        metavar="PATH",
    )
    challenge_token: str = setting(
        "",
        "the challenge's token issued by the registry (never pass it as a flag)",
        flag=False,
    )
    challenge_address: str = setting(
        "127.0.0.1:50070",
        "where the challenge listens on localhost: its gRPC ChallengeInternal server, or "
        "its HTTP server in http transport",
        metavar="HOST:PORT",
    )
    transport: str = setting(
        "grpc",
        "how the challenge is reached: grpc (ChallengeInternal) or http (the reference "
        "HTTP contract, translated by the shim)",
        choices=("grpc", "http"),
    )
    max_deadline: float = setting(
        30.0,
        "longest time any call to the challenge may take, whatever the master asks",
        metavar="SECONDS",
    )
    max_entries: int = setting(
        DEFAULT_MAX_ENTRIES, "most entries a GetWeights answer may carry", metavar="N"
    )
    max_response_bytes: int = setting(
        DEFAULT_MAX_RESPONSE_BYTES,
        "largest encoded GetWeights answer (protobuf bytes or HTTP body)",
        metavar="BYTES",
    )
    health_timeout: float = setting(
        5.0,
        "time the challenge gets to answer a health check before it counts as NOT_SERVING",
        metavar="SECONDS",
    )
    master_address: str = setting(
        "",
        "the master's gRPC address, where the broker door forwards Broker calls; "
        "empty disables the broker door",
        metavar="HOST:PORT",
    )
    broker_listen: str = setting(
        "127.0.0.1:50062",
        "loopback address of the broker door the challenge calls (given to the challenge "
        "as PLATFORM_BROKER_ADDR); port 0 picks a free port",
        metavar="HOST:PORT",
    )
    metrics_listen: str = setting(
        "127.0.0.1:9465",
        "Prometheus /metrics address HOST:PORT; empty disables it",
        metavar="HOST:PORT",
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = setting("json", "log format", choices=("json", "text"))
    shutdown_grace: float = setting(
        5.0, "seconds in-flight calls get to finish after SIGTERM", metavar="SECONDS"
    )
    max_concurrent_rpcs: int = setting(
        100, "calls served at once towards the master; more are refused", metavar="N"
    )
    ready_file: str = setting(
        "",
        "once serving, write the chosen addresses as JSON to this file "
        '({"listen": ..., "broker": ..., "metrics": ...}; useful with port 0)',
        metavar="PATH",
    )

    @property
    def limits(self) -> Limits:
        return Limits(max_entries=self.max_entries, max_response_bytes=self.max_response_bytes)

    def token_value(self) -> str:
        """The challenge token from PLATFORM_SHIM_CHALLENGE_TOKEN or the token file."""
        return secret_token(
            self.challenge_token,
            self.challenge_token_file,
            env="PLATFORM_SHIM_CHALLENGE_TOKEN",
            flag="--challenge-token-file",
            what="challenge token",
            min_length=TOKEN_MIN,
            hint="the token the registry returned when the challenge was created",
        )

    def check(self) -> None:
        """Refuse settings that cannot work, with a message naming the setting."""
        parse_host_port(self.listen, "--listen")
        parse_host_port(self.challenge_address, "--challenge-address")
        if not self.slug:
            raise ConfigError("--slug: required (the challenge's slug in the registry)")
        if len(self.slug) > SLUG_MAX or not _SLUG_RE.fullmatch(self.slug):
            raise ConfigError(
                "--slug: lowercase letters, digits and '-', starting with a letter, not ending "
                f"with '-', at most {SLUG_MAX} characters; got {self.slug!r}"
            )
        for name in ("max_deadline", "health_timeout", "shutdown_grace"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{name.replace('_', '-')}: must be positive; got {value}")
        if not 1 <= self.max_entries <= _MAX_ENTRIES_CEILING:
            raise ConfigError(
                f"--max-entries: must be 1..{_MAX_ENTRIES_CEILING}; got {self.max_entries}"
            )
        if not 1 <= self.max_response_bytes <= _MAX_BYTES_CEILING:
            raise ConfigError(
                f"--max-response-bytes: must be 1..{_MAX_BYTES_CEILING}; "
                f"got {self.max_response_bytes}"
            )
        if self.max_concurrent_rpcs < 1:
            raise ConfigError("--max-concurrent-rpcs: must be at least 1")
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "--metrics-listen")
        if self.master_address:
            parse_host_port(self.master_address, "--master-address")
            host, _ = parse_host_port(self.broker_listen, "--broker-listen")
            if not _is_loopback(host):
                raise ConfigError(
                    "--broker-listen: the broker door serves only the challenge in the same "
                    f"pod, so it must listen on a loopback address; got {host!r}"
                )
        self.token_value()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shim_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``PLATFORM_SHIM_*`` variables renamed to the ``PLATFORM_*`` names that
    :func:`platform_common.config.load` reads; every other variable is left out."""
    return {
        ENV_PREFIX + key[len(SHIM_ENV_PREFIX) :]: value
        for key, value in environ.items()
        if key.startswith(SHIM_ENV_PREFIX)
    }


def shim_help(text: str) -> str:
    """Help text with the shim's environment variable names."""
    return text.replace(f"(env {ENV_PREFIX}", f"(env {SHIM_ENV_PREFIX}")


def env_only_help() -> str:
    """Describe the settings read only from the environment or the file."""
    lines = [
        f"  {SHIM_ENV_PREFIX}{f.name.upper()}: {f.metadata['help']}"
        for f in dataclasses.fields(ShimConfig)
        if not f.metadata.get("flag", True)
    ]
    return "settings read only from the environment or the config file:\n" + "\n".join(lines)


def rename_env_in_help(parser: argparse.ArgumentParser) -> None:
    """Rewrite the ``(env PLATFORM_X ...)`` of every option's help to ``PLATFORM_SHIM_X``."""
    for action in parser._actions:  # argparse has no public way to edit a built parser
        if action.help:
            action.help = shim_help(action.help)
