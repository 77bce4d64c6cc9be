"""The `platform chain` command: serve a local simulated subnet to other processes.

Kept outside the `platform_common.chain` package so that building the `platform`
command line does not import the Bittensor SDK (about 1 s)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from platform_common import config as cfg
from platform_common import logs
from platform_common.config import ConfigError, parse_host_port, setting


@dataclass(frozen=True)
class ChainConfig:
    SECTION = "chain"

    state: str = setting(
        ".dev/chain.json",
        "state file of the simulated subnet; created with the subnet settings below when "
        "missing, resumed when present",
        metavar="PATH",
    )
    listen: str = setting(
        "127.0.0.1:9945",
        "HTTP listen address HOST:PORT, loopback only (port 0 picks a free port)",
        metavar="HOST:PORT",
    )
    netuid: int = setting(1, "netuid of the subnet (at creation)", metavar="N")
    neurons: int = setting(32, "neurons, i.e. uids, of the subnet (at creation)", metavar="N")
    validators: int = setting(
        4, "how many of the first uids hold validator permits and stake (at creation)", metavar="N"
    )
    block_time: float = setting(12.0, "seconds per block", metavar="SECONDS")
    manual_blocks: bool = setting(
        False, "produce blocks only when asked (the advance method), not with time"
    )
    history_blocks: int = setting(
        1024, "past blocks whose state stays readable (at creation)", metavar="BLOCKS"
    )
    tempo: int = setting(360, "tempo in blocks (at creation)", metavar="BLOCKS")
    weights_rate_limit: int = setting(
        100, "blocks between two weight submissions of a hotkey (at creation)", metavar="BLOCKS"
    )
    max_weight_limit: int = setting(
        65535, "largest share of one uid, in 65535ths (at creation)", metavar="U16"
    )
    min_allowed_weights: int = setting(
        1, "fewest non-zero weights a vector may have (at creation)", metavar="N"
    )
    commit_reveal: bool = setting(False, "commit-reveal weights (at creation)")
    weights_version: int = setting(
        0, "smallest version_key a weight submission may carry (at creation)", metavar="N"
    )
    ready_file: str = setting(
        "",
        "once serving, write the address HOST:PORT to this file (useful with port 0)",
        metavar="PATH",
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = setting("json", "log format", choices=("json", "text"))

    def check(self) -> None:
        """Refuse settings that cannot work, naming them."""
        host, _ = parse_host_port(self.listen, "--listen")
        if not _is_loopback(host):
            raise ConfigError(
                f"--listen: {host} is not a loopback address; the simulated chain has no "
                "authentication, so it only listens on 127.0.0.1, ::1 or localhost"
            )
        if self.block_time <= 0:
            raise ConfigError("--block-time: must be positive")
        if not 1 <= self.neurons <= 4096:
            raise ConfigError("--neurons: must be in 1..4096")
        if not 0 <= self.validators <= self.neurons:
            raise ConfigError("--validators: must be in 0..--neurons")
        if self.history_blocks < 1:
            raise ConfigError("--history-blocks: must be at least 1")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(subparsers: Any) -> None:
    """Add the ``chain`` subcommand."""
    parser = subparsers.add_parser(
        "chain",
        help="run the local simulated subnet (dev and tests; never a real network)",
        description="Serve a simulated Bittensor subnet over HTTP on loopback. Components "
        "reach it with the chain url local+http://HOST:PORT and run the real Bittensor SDK "
        "on top of it. State persists in --state; a restart resumes from it.",
        epilog="Settings marked (at creation) shape a new state file and are ignored when it "
        "exists.\n\nPrecedence: flags > PLATFORM_* environment > --config file > defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cfg.add_arguments(parser, ChainConfig)
    parser.set_defaults(func=run_chain)


def run_chain(args: argparse.Namespace) -> int:
    """Entry point of ``platform chain``."""
    from platform_common.chain.local import LocalSubnet, SubnetHyperparameters
    from platform_common.chain.server import serve

    try:
        config = cfg.load(ChainConfig, args)
        logs.configure("chain", config.log_level, config.log_format)
        config.check()
    except ConfigError as exc:
        print(f"platform chain: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("platform.chain")
    state = Path(config.state)
    try:
        if state.exists():
            subnet = LocalSubnet.open(
                state, block_time=config.block_time, manual_blocks=config.manual_blocks
            )
            log.info("resumed the simulated subnet from %s", state)
        else:
            subnet = LocalSubnet.create(
                state,
                netuid=config.netuid,
                neurons=config.neurons,
                validators=config.validators,
                block_time=config.block_time,
                manual_blocks=config.manual_blocks,
                history_blocks=config.history_blocks,
                hyperparameters=SubnetHyperparameters(
                    tempo=config.tempo,
                    weights_rate_limit=config.weights_rate_limit,
                    max_weight_limit=config.max_weight_limit,
                    min_allowed_weights=config.min_allowed_weights,
                    commit_reveal=config.commit_reveal,
                    weights_version=config.weights_version,
                ),
            )
            log.info("created the simulated subnet at %s", state)
    except (OSError, ValueError) as exc:
        print(f"platform chain: --state {state}: {exc}", file=sys.stderr)
        return 2
    host, port = parse_host_port(config.listen, "--listen")
    try:
        asyncio.run(serve(subnet, host, port, config.ready_file))
    except OSError as exc:
        log.error("could not serve on %s: %s", config.listen, exc)
        return 1
    return 0
