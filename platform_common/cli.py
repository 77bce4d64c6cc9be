"""The ``platform`` console script.

Subcommands are plugged in through the ``platform_network.commands`` entry-point
group (see pyproject.toml): each component registers its own, so this shared
module never imports the components above it.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import Any

from platform_common import grpc_setup


class Parser(argparse.ArgumentParser):
    """No prefix matching of long options, here and in every subcommand below (argparse
    builds subparsers with the class of their parent): ``--hotkey SECRET`` must not be taken
    for ``--hotkey-file SECRET``, nor ``--edge-token`` for ``--edge-token-file`` (a secret
    on the command line, visible in the process list)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="platform",
        description="Platform: a control plane that runs many challenges as one Bittensor subnet.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in sorted(entry_points(group="platform_network.commands"), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before any subcommand is loaded: gRPC reads its switches when first imported.
    grpc_setup.apply()
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
