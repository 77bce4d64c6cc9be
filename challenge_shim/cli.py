"""``platform shim``: the command-line entry point of the challenge shim."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from platform_common import config as cfg
from platform_common import logs


def register(subparsers: Any) -> None:
    from challenge_shim import config as shim_cfg

    parser = subparsers.add_parser(
        "shim",
        help="run the challenge shim (the sidecar the master talks to)",
        description="Run the challenge shim: serves ChallengeInternal to the master behind "
        "the challenge token, forwards each call to the challenge on localhost (gRPC, or the "
        "reference HTTP contract) with a deadline, validates every weights answer, and gives "
        "the challenge a local door to the master's Broker.",
        epilog=shim_cfg.env_only_help()
        + "\n\nPrecedence: flags > PLATFORM_SHIM_* environment > --config file ([shim] table)"
        " > defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cfg.add_arguments(parser, shim_cfg.ShimConfig)
    shim_cfg.rename_env_in_help(parser)
    parser.set_defaults(func=run_shim)


def run_shim(args: argparse.Namespace) -> int:
    from challenge_shim.app import StartupError, serve
    from challenge_shim.config import ShimConfig, shim_environ

    try:
        config = cfg.load(ShimConfig, args, environ=shim_environ(os.environ))
        logs.configure("shim", config.log_level, config.log_format)
        config.check()
    except cfg.ConfigError as exc:
        print(f"platform shim: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        logging.getLogger("challenge_shim").error("shim could not start: %s", exc)
        return 1
    return 0
