"""Settings of ``platform validator``: flags > ``PLATFORM_*`` environment > ``[validator]``
in a TOML file (``--config``) > defaults.

The agent trusts one thing it does not verify itself: the master's hotkey, which must
come from the operator (``master_hotkey``), never from the master. Everything else it
receives is checked against these settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from platform_common import ss58
from platform_common.config import (
    ConfigError,
    check_database_url,
    env_name,
    parse_host_port,
    setting,
)

if TYPE_CHECKING:
    from platform_common.keys import Signer


@dataclass(frozen=True)
class ValidatorConfig:
    SECTION = "validator"

    master: str = setting(
        "127.0.0.1:50051", "the master's gRPC address HOST:PORT", metavar="HOST:PORT"
    )
    master_hotkey: str = setting(
        "",
        "SS58 address of the master's hotkey: every weight vector must be signed by it "
        "(required; take it from the subnet operator, not from the master)",
        metavar="SS58",
    )
    hotkey_file: str = setting(
        "",
        "file holding this validator's hotkey (secret URI, mnemonic, 0x seed or an "
        "unencrypted wallet keyfile; alternative to PLATFORM_HOTKEY)",
        metavar="PATH",
    )
    hotkey: str = setting(
        "",
        "this validator's hotkey secret (secret URI, mnemonic or 0x seed; never pass it as a flag)",
        flag=False,
    )
    chain: str = setting(
        "",
        "chain the weights are submitted to (required): finney, test, ws(s)://..., "
        "local+file:PATH or local+http://HOST:PORT",
        metavar="URL",
    )
    netuid: int = setting(1, "subnet the weights are for", metavar="NETUID")
    mechanism_id: int = setting(0, "mechanism (sub-subnet) id the weights are for", metavar="ID")
    database_url: str = setting(
        "sqlite+aiosqlite:///validator.db",
        "the agent's own store (stream positions, submissions, reports): "
        "sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB",
        metavar="URL",
    )
    metrics_listen: str = setting(
        "127.0.0.1:9466",
        "HTTP address HOST:PORT of /metrics (Prometheus) and /healthz; empty disables both",
        metavar="HOST:PORT",
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = setting("json", "log format", choices=("json", "text"))
    reconnect_min: float = setting(
        0.5, "shortest backoff before reconnecting a stream to the master", metavar="SECONDS"
    )
    reconnect_max: float = setting(
        30.0, "longest backoff before reconnecting a stream to the master", metavar="SECONDS"
    )
    submit_attempts: int = setting(
        3,
        "attempts of a submission the chain refused or could not take (FAILED), while "
        "the vector is fresh; waits for the rate limit do not count",
        metavar="N",
    )
    submit_retry_delay: float = setting(
        6.0, "pause between two attempts of a failed submission", metavar="SECONDS"
    )
    chain_poll_interval: float = setting(
        6.0,
        "how often the chain head is read while waiting for the block the weights rate "
        "limit allows",
        metavar="SECONDS",
    )
    report_retry_max: float = setting(
        60.0,
        "longest pause between two attempts to deliver a submission report to the master",
        metavar="SECONDS",
    )
    clock_skew: float = setting(
        30.0,
        "tolerated difference between the master's clock and this host's: vectors created "
        "further in the future are refused",
        metavar="SECONDS",
    )
    shutdown_grace: float = setting(
        20.0,
        "seconds an in-flight submission gets to finish after SIGTERM",
        metavar="SECONDS",
    )
    run_challenges: bool = setting(
        False,
        "also run the registry's ACTIVE challenges on this host, each with its shim, "
        "through the local runtime (docs/validators.md)",
    )
    runtime_dir: str = setting(
        "validator-runtime",
        "with --run-challenges: state directory of the local runtime (per-challenge logs, "
        "instance records, the tokens this validator gave its shims)",
        metavar="PATH",
    )
    runtime_images: str = setting(
        "",
        "with --run-challenges: image map of the local runtime, JSON mapping image "
        "repositories to local commands (examples/images.json runs the sample challenges)",
        metavar="PATH",
    )
    runtime_keep_on_exit: bool = setting(
        False,
        "with --run-challenges: leave the challenges running when the agent exits; the next "
        "agent on the same --runtime-dir adopts them",
    )
    ready_file: str = setting(
        "",
        "once running, write the metrics address HOST:PORT to this file (useful with port 0)",
        metavar="PATH",
    )

    def check(self) -> None:
        """Refuse settings that cannot work, with a message naming the setting."""
        parse_host_port(self.master, "--master")
        if not self.master_hotkey:
            raise ConfigError(
                "--master-hotkey: required (the SS58 address of the master's hotkey, from the "
                "subnet operator; vectors signed by any other key are refused)"
            )
        why = ss58.check(self.master_hotkey)
        if why is not None:
            raise ConfigError(
                f"--master-hotkey: not a valid SS58 address ({why}); got {self.master_hotkey!r}"
            )
        if not self.chain:
            raise ConfigError(
                "--chain: required (finney, test, ws(s)://..., local+file:PATH or "
                "local+http://HOST:PORT)"
            )
        if not 0 <= self.netuid <= 65535:
            raise ConfigError(f"--netuid: must be 0..65535; got {self.netuid}")
        if not 0 <= self.mechanism_id <= 255:
            raise ConfigError(f"--mechanism-id: must be 0..255; got {self.mechanism_id}")
        check_database_url(self.database_url)
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "--metrics-listen")
        for name in (
            "reconnect_min",
            "reconnect_max",
            "submit_retry_delay",
            "chain_poll_interval",
            "report_retry_max",
            "shutdown_grace",
        ):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{name.replace('_', '-')}: must be positive; got {value}")
        if self.reconnect_max < self.reconnect_min:
            raise ConfigError(
                f"--reconnect-max: must be >= --reconnect-min ({self.reconnect_min}); "
                f"got {self.reconnect_max}"
            )
        if self.clock_skew < 0:
            raise ConfigError(f"--clock-skew: must be >= 0; got {self.clock_skew}")
        if self.submit_attempts < 1:
            raise ConfigError(f"--submit-attempts: must be at least 1; got {self.submit_attempts}")
        self._check_runtime()

    def _check_runtime(self) -> None:
        if not self.run_challenges:
            return
        from platform_common.runtime.images import ImageMapError, load

        if not self.runtime_images:
            raise ConfigError(
                "--runtime-images: required with --run-challenges (the image map; "
                "examples/images.json runs the sample challenges)"
            )
        if not self.runtime_dir:
            raise ConfigError("--runtime-dir: required with --run-challenges")
        try:
            load(Path(self.runtime_images))
        except ImageMapError as exc:
            raise ConfigError(f"--runtime-images: {exc}") from exc

    def signer(self) -> Signer:
        """This validator's hotkey from PLATFORM_HOTKEY or --hotkey-file."""
        # Imported here: the SDK takes a second and more to import, which every
        # `platform` command would pay (the CLI builds all subcommands' flags).
        from platform_common.keys import KeyLoadError, load_hotkey

        try:
            signer = load_hotkey(self.hotkey, self.hotkey_file, env=env_name("hotkey"))
        except KeyLoadError as exc:
            raise ConfigError(str(exc)) from None
        if signer is not None:
            return signer
        raise ConfigError(
            "no hotkey: set PLATFORM_HOTKEY or --hotkey-file (the validator hotkey that holds a "
            "validator permit on the subnet)"
        )
