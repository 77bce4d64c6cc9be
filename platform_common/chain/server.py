"""``platform chain``: the simulated subnet served over HTTP/JSON on loopback.

One endpoint, ``POST /v1/rpc`` with ``{"method": ..., "params": {...}}``, answers
``{"result": ...}`` or ``{"error": {"type": "chain" | "invalid" | "rejected", "message"}}``;
:class:`~platform_common.chain.remote.RemoteSubnet` is its client. ``GET /v1/health``
reports the netuid and the head. There is no authentication (it is a dev and test
tool): the settings refuse any address but loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from bittensor import ChainError

from platform_common.chain.extrinsic import ExtrinsicRejected
from platform_common.chain.local import LocalSubnet
from platform_common.chain.remote import RPC_PATH
from platform_common.config import join_host_port
from platform_common.files import write_atomically

log = logging.getLogger("platform.chain")

Handler = Callable[[LocalSubnet, Mapping[str, Any]], Awaitable[Any]]


async def _storage(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    return await subnet.storage(
        str(p["module"]), str(p["name"]), list(p["params"]), int(p["block"])
    )


async def _storage_map(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    return await subnet.storage_map(
        str(p["module"]), str(p["name"]), list(p["params"]), int(p["block"])
    )


async def _runtime(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    return await subnet.runtime(str(p["api"]), str(p["method"]), list(p["params"]), int(p["block"]))


async def _submit(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    extrinsic = p["extrinsic"]
    if not isinstance(extrinsic, dict):
        raise ValueError("extrinsic: must be an object")
    receipt = await subnet.submit(extrinsic)
    call = extrinsic.get("call") or {}
    log.info(
        "extrinsic %s.%s by %s: %s",
        call.get("module"),
        call.get("function"),
        extrinsic.get("signer"),
        "ok" if receipt.success else receipt.error_name,
        extra={"block": receipt.block, "extrinsic_hash": receipt.extrinsic_hash},
    )
    return receipt.to_json()


async def _register(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    return await subnet.register(
        str(p["hotkey"]),
        str(p["coldkey"]),
        stake=float(p.get("stake") or 0.0),
        validator_permit=bool(p.get("validator_permit")),
    )


async def _replace(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    await subnet.replace(
        _integer(p["uid"], "uid"),
        str(p["hotkey"]),
        str(p["coldkey"]),
        stake=float(p.get("stake") or 0.0),
        validator_permit=bool(p.get("validator_permit")),
    )


async def _set_neuron(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    stake = p.get("stake")
    permit = p.get("validator_permit")
    await subnet.set_neuron(
        _integer(p["uid"], "uid"),
        stake=None if stake is None else float(stake),
        validator_permit=None if permit is None else bool(permit),
    )


async def _set_hyperparameters(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    changes = p.get("changes") or {}
    if not isinstance(changes, dict):
        raise ValueError("changes: must be an object of hyperparameter names to values")
    return dataclasses.asdict(await subnet.set_hyperparameters(**changes))


async def _weights_set(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    block = p.get("block")
    row = await subnet.weights_set(p["who"], None if block is None else int(block))
    return None if row is None else row.to_json()


async def _commits(subnet: LocalSubnet, p: Mapping[str, Any]) -> Any:
    return [c.to_json() for c in await subnet.commits(p.get("who"))]


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer; got {value!r}")
    return value


METHODS: dict[str, Handler] = {
    "chain_info": lambda s, p: s.chain_info(),
    "head": lambda s, p: s.head(),
    "storage": _storage,
    "storage_map": _storage_map,
    "runtime": _runtime,
    "next_nonce": lambda s, p: s.next_nonce(str(p["address"])),
    "submit": _submit,
    "register": _register,
    "replace": _replace,
    "set_neuron": _set_neuron,
    "set_hyperparameters": _set_hyperparameters,
    "advance": lambda s, p: s.advance(_integer(p.get("blocks", 1), "blocks")),
    "weights_set": _weights_set,
    "commits": _commits,
}


def _error(kind: str, message: str, status: int) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


def build_app(subnet: LocalSubnet) -> web.Application:
    """The aiohttp application serving ``subnet``."""

    async def rpc(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error("invalid", f"request body is not JSON: {exc}", 400)
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            return _error("invalid", 'expected {"method": NAME, "params": {...}}', 400)
        handler = METHODS.get(body["method"])
        if handler is None:
            return _error("invalid", f"unknown method {body['method']!r}", 404)
        params = body.get("params") or {}
        if not isinstance(params, dict):
            return _error("invalid", "params: must be an object", 400)
        try:
            result = await handler(subnet, params)
        except ChainError as exc:
            return _error("chain", exc.message, 200)
        except ExtrinsicRejected as exc:
            return _error("rejected", str(exc), 200)
        except KeyError as exc:
            return _error("invalid", f"missing parameter {exc}", 400)
        except (ValueError, TypeError) as exc:
            return _error("invalid", str(exc), 400)
        return web.json_response({"result": result})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"netuid": subnet.netuid, "head": await subnet.head()})

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post(RPC_PATH, rpc)
    app.router.add_get("/v1/health", health)
    return app


async def serve(subnet: LocalSubnet, host: str, port: int, ready_file: str = "") -> None:
    """Serve ``subnet`` until SIGTERM or SIGINT; then pause its clock and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    address = join_host_port(host, sock.getsockname()[1])
    runner = web.AppRunner(build_app(subnet), access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        head = await subnet.head()
        log.info(
            "simulated subnet %s serving on http://%s (chain url local+http://%s), block %s",
            subnet.netuid,
            address,
            address,
            head,
            extra={"state": str(subnet.path), "block_time": subnet.block_time},
        )
        if ready_file:
            write_atomically(Path(ready_file), address + "\n")
        await stop.wait()
    finally:
        await runner.cleanup()
        sock.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    head = await subnet.pause()
    log.info("stopped; state saved at block %s", head, extra={"state": str(subnet.path)})
