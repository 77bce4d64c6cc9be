"""``platform master``, ``platform db`` and ``platform edge``: entry points of the master."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from platform_common import config as cfg
from platform_common import logs


def register(subparsers: Any) -> None:
    from master.config import MasterConfig

    parser = subparsers.add_parser(
        "master",
        help="run the master (registry, weights, broker, edge control plane)",
        description="Run the Platform master: a gRPC server with the challenge registry, "
        "health, reflection and Prometheus metrics.",
        epilog=cfg.env_only_help(MasterConfig)
        + "\n\nPrecedence: flags > PLATFORM_* environment > --config file > defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cfg.add_arguments(parser, MasterConfig)
    parser.set_defaults(func=run_master)


def register_db(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "db",
        help="control-plane database maintenance",
        description="Apply or inspect the control-plane database migrations.",
    )
    actions = parser.add_subparsers(dest="db_action", required=True, metavar="ACTION")
    for name, text in (
        ("upgrade", "apply every pending migration"),
        ("current", "print the schema revision of the database and of this release"),
    ):
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--database-url",
            metavar="URL",
            default=argparse.SUPPRESS,
            help="database URL (env PLATFORM_DATABASE_URL; default: the master's default)",
        )
        sub.set_defaults(func=run_db)


def register_edge(subparsers: Any) -> None:
    from master.edge.model import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEAP_BYTES

    parser = subparsers.add_parser(
        "edge",
        help="the Envoy edge: render the bootstrap of an Envoy run on its own",
        description="Tools for an Envoy edge that runs on its own (not started by the master "
        "with --edge-envoy), e.g. in Kubernetes.",
    )
    actions = parser.add_subparsers(dest="edge_action", required=True, metavar="ACTION")
    text = (
        "print the Envoy bootstrap pointing at a master's xDS (the edge token comes from "
        "PLATFORM_EDGE_TOKEN or --edge-token-file)"
    )
    sub = actions.add_parser("bootstrap", help=text, description=text)
    sub.add_argument("--xds", required=True, metavar="HOST:PORT", help="the master's gRPC address")
    sub.add_argument("--node-id", required=True, metavar="ID", help="this Envoy's node id")
    sub.add_argument(
        "--admin", default="127.0.0.1:9901", metavar="HOST:PORT", help="Envoy's admin address"
    )
    sub.add_argument("--edge-token-file", default="", metavar="PATH")
    sub.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"client connections Envoy holds at most (default {DEFAULT_MAX_CONNECTIONS})",
    )
    sub.add_argument(
        "--max-heap-bytes",
        type=int,
        default=DEFAULT_MAX_HEAP_BYTES,
        metavar="BYTES",
        help="Envoy's heap budget: near it Envoy frees memory, then answers new requests "
        f"503; keep it below the memory Envoy may use (default {DEFAULT_MAX_HEAP_BYTES})",
    )
    sub.add_argument(
        "--output",
        default="",
        metavar="PATH",
        help="write the bootstrap to PATH (mode 0600: it holds the edge token) instead of "
        "printing it",
    )
    sub.set_defaults(func=run_edge_bootstrap)

    text = (
        "drain an edge Envoy before it stops (a pod's preStop): start its graceful drain "
        "(clients are told to reconnect elsewhere) and wait until no request is in flight"
    )
    sub = actions.add_parser("drain", help=text, description=text)
    sub.add_argument(
        "--admin", default="127.0.0.1:9901", metavar="HOST:PORT", help="Envoy's admin address"
    )
    sub.add_argument(
        "--min-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="wait at least this long, while clients still arriving are served (default 5)",
    )
    sub.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="give up waiting for requests in flight after this long (default 60); "
        "exit status 1 then",
    )
    sub.set_defaults(func=run_edge_drain)


def run_edge_bootstrap(args: argparse.Namespace) -> int:
    import os

    from master.edge.model import bootstrap_limit_problem
    from master.edge.proxy import render_bootstrap
    from platform_common.config import ConfigError, parse_host_port, secret_token
    from platform_common.files import write_atomically

    try:
        token = secret_token(
            os.environ.get("PLATFORM_EDGE_TOKEN", ""),
            args.edge_token_file,
            env="PLATFORM_EDGE_TOKEN",
            flag="--edge-token-file",
            what="edge token",
            min_length=16,
            hint="the same token the master is given",
        )
        xds_host, xds_port = parse_host_port(args.xds, "--xds")
        admin_host, admin_port = parse_host_port(args.admin, "--admin")
        problem = bootstrap_limit_problem(
            max_connections=args.max_connections, max_heap_bytes=args.max_heap_bytes
        )
        if problem is not None:
            name, rule = problem
            raise ConfigError(f"--{name.replace('_', '-')}: {rule}")
        bootstrap = render_bootstrap(
            node_id=args.node_id,
            admin_host=admin_host,
            admin_port=admin_port,
            xds_host=xds_host,
            xds_port=xds_port,
            edge_token=token,
            max_connections=args.max_connections,
            max_heap_bytes=args.max_heap_bytes,
        )
        if args.output:
            write_atomically(Path(args.output), bootstrap, private=True)
        else:
            print(bootstrap, end="")
    except (ConfigError, ValueError, OSError) as exc:
        print(f"platform edge bootstrap: {exc}", file=sys.stderr)
        return 2
    return 0


def run_edge_drain(args: argparse.Namespace) -> int:
    from master.edge.proxy import drain
    from platform_common.config import ConfigError, join_host_port, parse_host_port

    try:
        host, port = parse_host_port(args.admin, "--admin")
        if args.timeout <= 0:
            raise ConfigError("--timeout: must be more than 0 seconds")
        if not 0 <= args.min_seconds <= args.timeout:
            raise ConfigError("--min-seconds: must be between 0 and --timeout")
    except ConfigError as exc:
        print(f"platform edge drain: {exc}", file=sys.stderr)
        return 2
    admin = f"http://{join_host_port(host, port)}"
    try:
        result = asyncio.run(drain(admin, min_seconds=args.min_seconds, timeout=args.timeout))
    except OSError as exc:
        print(f"platform edge drain: {exc}", file=sys.stderr)
        return 1
    if result.exited:
        print(f"drained: Envoy stopped after {result.seconds:.1f} s")
    elif result.drained:
        print(f"drained: no request in flight after {result.seconds:.1f} s")
    else:
        print(
            f"platform edge drain: requests still in flight after {result.seconds:.1f} s "
            f"(--timeout): {result.active}",
            file=sys.stderr,
        )
        return 1
    return 0


def run_master(args: argparse.Namespace) -> int:
    from master.app import StartupError, serve
    from master.config import MasterConfig

    try:
        config = cfg.load(MasterConfig, args)
        logs.configure("master", config.log_level, config.log_format)
        config.check()
        config.admin_token_value()
    except cfg.ConfigError as exc:
        print(f"platform master: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        logging.getLogger("master").error("master could not start: %s", exc)
        return 1
    return 0


def run_db(args: argparse.Namespace) -> int:
    from master.config import MasterConfig
    from master.db import migrate
    from master.db.engine import create_engine

    config = cfg.load(MasterConfig, args)

    async def act() -> str:
        engine = create_engine(config.database_url)
        try:
            if args.db_action == "upgrade":
                await migrate.upgrade(engine)
            current = await migrate.current_revision(engine)
            return f"database: {current or '(empty)'}  release: {migrate.head_revision()}"
        finally:
            await engine.dispose()

    try:
        print(asyncio.run(act()))
    except cfg.ConfigError as exc:
        print(f"platform db: {exc}", file=sys.stderr)
        return 2
    return 0
