"""``platform miner``: call a challenge through the edge with a signed request.

Signed routes of a challenge need the request signed with the miner's hotkey,
following the Bittensor SDK's signed HTTP request convention (``btauth/1``,
``bittensor.http_auth``): the headers carry the hotkey, a nanosecond nonce and
an sr25519 signature over the method, the request target exactly as sent
(path and query), the SHA-256 of the body, the nonce and the addresses. The
edge checks them before the request reaches the challenge.

This command is a reference client; any HTTP client that sends the same headers
works (see docs/miners.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HOTKEY_ENV = "PLATFORM_MINER_HOTKEY"


def signed_headers(
    signer: Any, method: str, target: str, body: bytes = b"", receiver: str | None = None
) -> dict[str, str]:
    """The ``btauth/1`` headers for one request; ``target`` is the path plus ``?query``
    exactly as it will be sent. Each call signs a fresh nonce: never reuse headers."""
    from bittensor import http_auth

    keypair = getattr(signer, "keypair", signer)
    return dict(
        http_auth.sign(keypair, method=method, path=target, body=body, receiver_ss58=receiver)
    )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "miner",
        help="call a challenge through the edge, signing the request with your hotkey",
        description=(
            "Send one HTTP request to a challenge through the platform's edge, signed "
            f"with the hotkey from ${HOTKEY_ENV} (secret URI, mnemonic or 0x seed) or "
            "--hotkey-file. Prints the response body; exits 1 on an HTTP error status."
        ),
    )
    parser.add_argument("method", help="HTTP method, e.g. GET or POST")
    parser.add_argument("url", help="e.g. http://127.0.0.1:8080/challenges/alpha/submit")
    parser.add_argument("--data", default="", help="request body; @FILE reads it from a file")
    parser.add_argument(
        "--header", action="append", default=[], metavar="NAME:VALUE", help="extra header"
    )
    parser.add_argument(
        "--hotkey-file", default="", metavar="PATH", help=f"hotkey file (instead of ${HOTKEY_ENV})"
    )
    parser.add_argument(
        "--receiver", default=None, metavar="SS58", help="bind the request to this hotkey"
    )
    parser.add_argument("--unsigned", action="store_true", help="send without a signature")
    parser.add_argument(
        "--include", "-i", action="store_true", help="print the status line and headers too"
    )
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    parser.set_defaults(func=run)


def _body(data: str) -> bytes:
    if data.startswith("@"):
        return Path(data[1:]).read_bytes()
    return data.encode()


def _signer(args: argparse.Namespace) -> Any:
    from platform_common.keys import load_hotkey

    signer = load_hotkey(os.environ.get(HOTKEY_ENV, ""), args.hotkey_file, env=HOTKEY_ENV)
    if signer is None:
        raise ValueError(f"no hotkey: set {HOTKEY_ENV} or --hotkey-file (or pass --unsigned)")
    return signer


def run(args: argparse.Namespace) -> int:
    method = args.method.upper()
    url = urllib.parse.urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.netloc:
        print(f"platform miner: not an http(s) URL: {args.url}", file=sys.stderr)
        return 2
    target = url.path or "/"
    if url.query:
        target += "?" + url.query
    try:
        body = _body(args.data)
        headers = (
            {}
            if args.unsigned
            else signed_headers(_signer(args), method, target, body, args.receiver)
        )
    except (OSError, ValueError) as exc:
        print(f"platform miner: {exc}", file=sys.stderr)
        return 2
    for item in args.header:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    if body and "Content-Type" not in headers:
        headers["Content-Type"] = "application/json"
    # The scheme was checked above: http or https only.
    request = urllib.request.Request(  # noqa: S310
        args.url, data=body or None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:  # noqa: S310
            status, reason, answer, got = (
                response.status,
                response.reason,
                response.read(),
                response.headers,
            )
    except urllib.error.HTTPError as exc:
        status, reason, answer, got = exc.code, exc.reason, exc.read(), exc.headers
    except OSError as exc:
        print(f"platform miner: {exc}", file=sys.stderr)
        return 2
    if args.include:
        print(f"HTTP {status} {reason}")
        for name, value in got.items():
            print(f"{name}: {value}")
        print()
    text = answer.decode(errors="replace")
    print(text, end="" if text.endswith("\n") else "\n")
    return 0 if status < 400 else 1
