"""Miner authentication at the edge: the master's ext_authz service for Envoy.

Routes the registry marks as signed pass through Envoy's ``ext_authz`` filter,
which sends every request's method, path, headers and raw body here. A request
is let through only when it carries a valid ``btauth/1`` signature
(``bittensor.http_auth``) by a hotkey registered on the subnet, fresh and never
seen before. Envoy then forwards it with the verified identity in
:data:`~master.edge.model.VERIFIED_HOTKEY_HEADER` and
:data:`~master.edge.model.VERIFIED_UID_HEADER`, overwriting whatever the client
sent under those names, so a challenge can trust them without verifying
anything itself.

Checks run cheapest-first and stateless-first: header shape, receiver binding,
freshness and the signature (all inside ``http_auth.verify``, with the replay
check deferred), then registration (memory, see
:class:`~master.edge.hotkeys.RegisteredHotkeys`), and only then the nonce
claim in the database (:class:`~master.edge.nonces.NonceStore`). So
unauthenticated or unregistered traffic never writes to the database and
cannot burn a legitimate sender's nonce.

The path Envoy reports is the request target at the ext_authz filter: the
public ``/challenges/{slug}/...`` path with its query string, after Envoy's
path normalization. Clients sign exactly that.

Every outcome is a ``CheckResponse``; ``Check`` never fails the RPC, so
Envoy's failure-mode settings only ever apply when the master is unreachable.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import grpc
from bittensor import http_auth
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2
from sqlalchemy.exc import SQLAlchemyError

from master.edge.hotkeys import ChainUnavailable, RegisteredHotkeys
from master.edge.model import VERIFIED_HOTKEY_HEADER, VERIFIED_UID_HEADER
from master.edge.nonces import NonceStore
from master.edge.telemetry import AUTHZ_CHECKS, AUTHZ_SECONDS

log = logging.getLogger(__name__)

AUTH_ERROR_HEADER = "x-platform-auth-error"

# Kept after a nonce leaves the freshness window, so master replicas whose clocks
# disagree by up to this much still agree on replays.
NONCE_RETENTION_MARGIN = 30.0

# The only request headers verify() reads; Envoy sends header names lowercased.
_AUTH_HEADERS = tuple(
    name.lower()
    for name in (
        http_auth.HEADER_VERSION,
        http_auth.HEADER_HOTKEY,
        http_auth.HEADER_RECEIVER,
        http_auth.HEADER_NONCE,
        http_auth.HEADER_CRYPTO,
        http_auth.HEADER_SIGNATURE,
    )
)
_SIGNATURE_HEADER = http_auth.HEADER_SIGNATURE.lower()

# Receiver used when the edge is bound to no hotkey: never equal to a header
# value that names one, so every receiver-bound request is refused.
_NO_RECEIVER = ""

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class _Refusal(NamedTuple):
    http_status: int
    rpc_code: int
    error: str


_UNAUTHENTICATED = _Refusal(401, code_pb2.UNAUTHENTICATED, "unauthenticated")
REFUSALS: dict[str, _Refusal] = {
    "missing_signature": _UNAUTHENTICATED,
    "malformed": _UNAUTHENTICATED,
    "wrong_receiver": _UNAUTHENTICATED,
    "stale": _UNAUTHENTICATED,
    "bad_signature": _UNAUTHENTICATED,
    "not_registered": _Refusal(403, code_pb2.PERMISSION_DENIED, "forbidden"),
    "replayed": _Refusal(409, code_pb2.PERMISSION_DENIED, "replayed"),
    "chain_unavailable": _Refusal(503, code_pb2.UNAVAILABLE, "unavailable"),
    "nonce_store_unavailable": _Refusal(503, code_pb2.UNAVAILABLE, "unavailable"),
    "internal_error": _Refusal(503, code_pb2.UNAVAILABLE, "unavailable"),
}
OK = "ok"

_MESSAGES = {
    "missing_signature": "this route needs a request signed with the btauth/1 scheme "
    "(X-Bittensor-* headers)",
    "not_registered": "the signing hotkey is not registered on the subnet",
    "replayed": "this signed request was already accepted; sign every request with a fresh nonce",
    "chain_unavailable": "the subnet's registrations cannot be read right now; retry shortly",
    "nonce_store_unavailable": "requests cannot be checked for replay right now; retry shortly",
    "internal_error": "the request could not be checked; retry shortly",
}

_AUTH_ERRORS: tuple[tuple[type[http_auth.AuthError], str], ...] = (
    (http_auth.WrongReceiver, "wrong_receiver"),
    (http_auth.StaleRequest, "stale"),
    (http_auth.BadSignature, "bad_signature"),
)


class _DeferredReplayCheck:
    """The nonce store handed to ``http_auth.verify``: accepts every pair.

    verify() consults its store last, after the signature; the replay decision is
    taken later, in the database, once the hotkey is known to be registered.
    """

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        return True


_DEFERRED = _DeferredReplayCheck()


class AuthzService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``envoy.service.auth.v3.Authorization``: see the module docstring."""

    def __init__(
        self,
        nonces: NonceStore,
        hotkeys: RegisteredHotkeys,
        *,
        receiver_ss58: str | None,
        max_age: float = http_auth.DEFAULT_MAX_AGE,
        allowed_skew: float = http_auth.DEFAULT_ALLOWED_SKEW,
    ) -> None:
        if max_age <= 0 or allowed_skew < 0:
            raise ValueError("max_age must be > 0 and allowed_skew >= 0 seconds")
        self._nonces = nonces
        self._hotkeys = hotkeys
        self._receiver = receiver_ss58 or _NO_RECEIVER
        self._max_age = max_age
        self._allowed_skew = allowed_skew
        self._retention = timedelta(seconds=max_age + allowed_skew + NONCE_RETENTION_MARGIN)
        self._counters = {decision: AUTHZ_CHECKS.labels(decision) for decision in (OK, *REFUSALS)}

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register this service on ``server``."""
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self, server)

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        try:
            response, decision = await self._check(request)
        except Exception:
            log.exception("ext_authz check failed")
            decision = "internal_error"
            response = _denied(decision, _MESSAGES[decision])
        self._counters[decision].inc()
        AUTHZ_SECONDS.observe(time.perf_counter() - started)
        return response

    async def _check(self, request: Any) -> tuple[Any, str]:
        attributes = request.attributes
        http = attributes.request.http
        headers = http.headers
        auth = {name: headers[name] for name in _AUTH_HEADERS if name in headers}
        if not auth and http.header_map.headers:
            # Envoy sends header_map instead of headers when encode_raw_headers is on.
            auth = _from_header_map(http.header_map.headers)
        body = http.raw_body or http.body.encode()
        try:
            caller = http_auth.verify(
                auth,
                body,
                method=http.method,
                path=http.path,
                self_hotkey_ss58=self._receiver,
                require_receiver=False,
                max_age=self._max_age,
                allowed_skew=self._allowed_skew,
                nonce_store=_DEFERRED,
            )
        except http_auth.AuthError as exc:
            reason = _auth_reason(exc, auth)
            message = _MESSAGES.get(reason) or str(exc)
            log.debug(
                "ext_authz refused",
                extra={"slug": _slug(attributes), "reason": reason},
            )
            return _denied(reason, message), reason

        hotkey = caller.hotkey_ss58
        try:
            uid = await self._hotkeys.lookup(hotkey)
        except ChainUnavailable:
            return self._refuse("chain_unavailable", attributes, hotkey)
        if uid is None:
            return self._refuse("not_registered", attributes, hotkey)

        expire_time = datetime.fromtimestamp(caller.nonce_ns / 1e9, UTC) + self._retention
        try:
            fresh = await self._nonces.claim(hotkey, caller.nonce_ns, expire_time)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("ext_authz nonce store unavailable", extra={"error": str(exc)})
            return self._refuse("nonce_store_unavailable", attributes, hotkey)
        if not fresh:
            return self._refuse("replayed", attributes, hotkey)

        log.debug("ext_authz ok", extra={"slug": _slug(attributes), "hotkey": hotkey, "uid": uid})
        return _ok(hotkey, uid), OK

    def _refuse(self, reason: str, attributes: Any, hotkey: str) -> tuple[Any, str]:
        log.debug(
            "ext_authz refused",
            extra={"slug": _slug(attributes), "reason": reason, "hotkey": hotkey},
        )
        return _denied(reason, _MESSAGES[reason]), reason


def _slug(attributes: Any) -> str:
    return str(attributes.context_extensions.get("slug", ""))


def _from_header_map(entries: Any) -> dict[str, str]:
    wanted = set(_AUTH_HEADERS)
    found: dict[str, str] = {}
    for entry in entries:
        key = entry.key.lower()
        if key in wanted:
            found[key] = entry.raw_value.decode("utf-8", "replace") or entry.value
    return found


def _auth_reason(exc: http_auth.AuthError, auth: dict[str, str]) -> str:
    for kind, reason in _AUTH_ERRORS:
        if isinstance(exc, kind):
            return reason
    if isinstance(exc, http_auth.MalformedAuth) and _SIGNATURE_HEADER not in auth:
        return "missing_signature"
    return "malformed"


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def _ok(hotkey: str, uid: int) -> Any:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                _header(VERIFIED_HOTKEY_HEADER, hotkey),
                _header(VERIFIED_UID_HEADER, str(uid)),
            ]
        ),
    )


def _denied(reason: str, message: str) -> Any:
    refusal = REFUSALS[reason]
    body = json.dumps({"error": refusal.error, "reason": reason, "message": message})
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=refusal.rpc_code, message=reason),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=refusal.http_status),
            headers=[
                _header("content-type", "application/json"),
                _header(AUTH_ERROR_HEADER, reason),
            ],
            body=body,
        ),
    )
