"""HTTP compatibility mode: the reference platform's HTTP contract, translated.

The challenge serves, on localhost:

* ``GET /internal/v1/get_weights`` answering ``{"weights": {"<hotkey>": <score>}}``
  (optionally with a ``"scoring_version"`` string). The shim sends
  ``Authorization: Bearer <challenge token>``, ``X-Platform-Challenge-Slug: <slug>``
  and the request context as query parameters (``epoch``, ``epoch_id``, ``netuid``,
  ``metagraph_block``, ``time_budget_ms``);
* ``GET /health``: any 2xx is SERVING, anything else NOT_SERVING;
* ``GET /version``: a JSON object whose ``"version"`` is the challenge's version (its
  other scalar members become GetInfo metadata), or a plain-text version.

The body of the weights answer is read only up to ``max_response_bytes``: a larger
``Content-Length`` is refused before reading, a longer body is cut off at the limit.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from challenge_shim.upstream import (
    ERROR_TEXT_MAX,
    ChallengeCallError,
    Metadata,
    challenge_answered,
    too_slow,
    unreachable,
)
from platform_common.answers import Limits, check_size, parse_http_answer
from platform_common.config import ConfigError
from platform_network.v1 import challenge_pb2, common_pb2

SLUG_HEADER = "X-Platform-Challenge-Slug"
WEIGHTS_PATH = "/internal/v1/get_weights"
HEALTH_PATH = "/health"
VERSION_PATH = "/version"
_CHUNK = 64 * 1024
# Enough of an error body to keep ERROR_TEXT_MAX characters of it.
_ERROR_BODY_BYTES = 4 * ERROR_TEXT_MAX
_VERSION_BODY_BYTES = 64 * 1024


class HttpUpstream:
    """A challenge that speaks the reference HTTP contract."""

    transport = challenge_pb2.CHALLENGE_TRANSPORT_HTTP

    def __init__(self, address: str, slug: str, limits: Limits) -> None:
        if "/" in address:
            raise ConfigError(f"--challenge-address: expected HOST:PORT; got {address!r}")
        self.address = address
        self._base = f"http://{address}"
        self._slug = slug
        self._limits = limits
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No keep-alive: a few calls per epoch, and a connection kept across a
            # challenge restart would fail the next call for nothing.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def _headers(self, metadata: Metadata) -> dict[str, str]:
        headers = {SLUG_HEADER: self._slug, "Accept-Encoding": "identity"}
        for key, value in metadata:
            if key == "authorization":
                headers["Authorization"] = value
        return headers

    async def get_weights(
        self, request: challenge_pb2.GetWeightsRequest, metadata: Metadata, budget: float
    ) -> challenge_pb2.GetWeightsResponse:
        params = {
            "epoch": str(request.epoch),
            "epoch_id": request.epoch_id,
            "netuid": str(request.netuid),
            "metagraph_block": str(request.metagraph_block),
            "time_budget_ms": str(int(budget * 1000)),
        }
        body = await self._get(WEIGHTS_PATH, metadata, budget, params=params, weights=True)
        return parse_http_answer(body, self._limits)

    async def health(self, metadata: Metadata, budget: float) -> challenge_pb2.HealthResponse:
        try:
            await self._get(HEALTH_PATH, metadata, budget)
        except ChallengeCallError as exc:
            if exc.code.name != "UNKNOWN":
                raise
            return challenge_pb2.HealthResponse(
                status=challenge_pb2.HEALTH_STATUS_NOT_SERVING, message=exc.message
            )
        return challenge_pb2.HealthResponse(status=challenge_pb2.HEALTH_STATUS_SERVING)

    async def get_info(self, metadata: Metadata, budget: float) -> challenge_pb2.GetInfoResponse:
        body = await self._get(VERSION_PATH, metadata, budget)
        text = body.decode("utf-8", errors="replace").strip()
        answer = challenge_pb2.GetInfoResponse(
            api_version="v1",
            capabilities=[
                challenge_pb2.CHALLENGE_CAPABILITY_WEIGHTS,
                challenge_pb2.CHALLENGE_CAPABILITY_HEALTH,
                challenge_pb2.CHALLENGE_CAPABILITY_HTTP_COMPAT,
            ],
        )
        try:
            document: Any = json.loads(text)
        except ValueError:
            document = None
        if isinstance(document, dict):
            version = document.get("version")
            answer.challenge_version = version if isinstance(version, str) else ""
            for key, value in document.items():
                scalar = _scalar(value)
                if key != "version" and scalar is not None:
                    answer.metadata[key].CopyFrom(scalar)
        else:
            answer.challenge_version = text
        return answer

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get(
        self,
        path: str,
        metadata: Metadata,
        budget: float,
        *,
        params: dict[str, str] | None = None,
        weights: bool = False,
    ) -> bytes:
        url = self._base + path
        try:
            async with asyncio.timeout(budget):
                async with self._client().get(
                    url, headers=self._headers(metadata), params=params, allow_redirects=False
                ) as response:
                    if not 200 <= response.status < 300:
                        error = await _read_at_most(response, _ERROR_BODY_BYTES)
                        raise challenge_answered(
                            f"HTTP {response.status}",
                            error.decode("utf-8", errors="replace").strip()
                            or (response.reason or ""),
                        )
                    if not weights:
                        return await _read_at_most(response, _VERSION_BODY_BYTES)
                    limit = self._limits.max_response_bytes
                    if response.content_length is not None and response.content_length > limit:
                        check_size(response.content_length, self._limits)
                    body = await _read_at_most(response, limit + 1)
                    if len(body) > limit:
                        check_size(None, self._limits)
                    return body
        except TimeoutError as exc:
            raise too_slow(budget) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise unreachable(url, str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientResponseError as exc:
            raise challenge_answered("a malformed HTTP response", str(exc)) from exc


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body; reading stops there."""
    body = bytearray()
    while len(body) < limit:
        chunk = await response.content.read(min(_CHUNK, limit - len(body)))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _scalar(value: Any) -> common_pb2.ScalarValue | None:
    if isinstance(value, bool):
        return common_pb2.ScalarValue(bool_value=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return common_pb2.ScalarValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.ScalarValue(double_value=value)
    if isinstance(value, str):
        return common_pb2.ScalarValue(string_value=value)
    return None
