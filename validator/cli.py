"""``platform validator``: the command-line entry point of the validator agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from platform_common import config as cfg
from platform_common import logs


def register(subparsers: Any) -> None:
    from validator.config import ValidatorConfig

    parser = subparsers.add_parser(
        "validator",
        help="run the validator agent (verify the master's weight vectors, submit them on chain)",
        description="Run the validator agent: streams the registry and the weight vectors from "
        "the master (calls signed with the validator's hotkey), verifies every vector (the "
        "master's signature, subnet, freshness, order), submits each epoch at most once "
        "through the Bittensor SDK, and reports every outcome to the master. See "
        "docs/validators.md.",
        epilog=cfg.env_only_help(ValidatorConfig)
        + "\n\nPrecedence: flags > PLATFORM_* environment > --config file ([validator] table)"
        " > defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cfg.add_arguments(parser, ValidatorConfig)
    parser.set_defaults(func=run_validator)


def run_validator(args: argparse.Namespace) -> int:
    from validator.config import ValidatorConfig

    try:
        config = cfg.load(ValidatorConfig, args)
        logs.configure("validator", config.log_level, config.log_format)
        config.check()
        signer = config.signer()
    except cfg.ConfigError as exc:
        print(f"platform validator: {exc}", file=sys.stderr)
        return 2
    from validator.agent import StartupError, serve

    try:
        asyncio.run(serve(config, signer))
    except StartupError as exc:
        logging.getLogger("validator").error("validator could not start: %s", exc)
        return 1
    return 0
