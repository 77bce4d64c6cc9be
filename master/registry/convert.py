"""Conversions between the registry's protobuf messages and its plain rules types."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from master.registry.rules import Challenge, ResourceSpec, Routes, Scalar, Spec, Status
from platform_common.protos import scalar_from_proto, scalar_to_proto
from platform_network.v1 import common_pb2, registry_pb2


def spec_from_proto(msg: registry_pb2.ChallengeSpec) -> Spec:
    r = msg.routes
    res = msg.resources
    return Spec(
        slug=msg.slug,
        name=msg.name,
        description=msg.description,
        image=msg.image,
        emission_share=msg.emission_share,
        routes=Routes(
            public_port=r.public_port,
            blocked_path_prefixes=tuple(r.blocked_path_prefixes),
            signed_path_prefixes=tuple(r.signed_path_prefixes),
            rate_limit_per_hotkey_per_minute=r.rate_limit_per_hotkey_per_minute,
            rate_limit_per_ip_per_minute=r.rate_limit_per_ip_per_minute,
            max_request_body_bytes=r.max_request_body_bytes,
            request_timeout_seconds=r.request_timeout_seconds,
        ),
        resources=ResourceSpec(cpu=res.cpu, memory=res.memory, gpu=res.gpu, storage=res.storage),
        env=dict(msg.env),
        metadata={k: scalar_from_proto(v) for k, v in msg.metadata.items()},
    )


def _metadata(values: Mapping[str, Scalar]) -> dict[str, common_pb2.ScalarValue]:
    return {k: scalar_to_proto(v) for k, v in values.items()}


def _ts(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def routes_to_proto(routes: Routes) -> registry_pb2.PublicRoutes:
    return registry_pb2.PublicRoutes(
        public_port=routes.public_port,
        blocked_path_prefixes=routes.blocked_path_prefixes,
        signed_path_prefixes=routes.signed_path_prefixes,
        rate_limit_per_hotkey_per_minute=routes.rate_limit_per_hotkey_per_minute,
        rate_limit_per_ip_per_minute=routes.rate_limit_per_ip_per_minute,
        max_request_body_bytes=routes.max_request_body_bytes,
        request_timeout_seconds=routes.request_timeout_seconds,
    )


def challenge_to_proto(challenge: Challenge) -> registry_pb2.Challenge:
    spec = challenge.spec
    res = spec.resources
    return registry_pb2.Challenge(
        slug=spec.slug,
        name=spec.name,
        description=spec.description,
        image=spec.image,
        emission_share=spec.emission_share,
        status=registry_pb2.ChallengeStatus.ValueType(int(challenge.status)),
        routes=routes_to_proto(spec.routes),
        resources=common_pb2.Resources(
            cpu=res.cpu, memory=res.memory, gpu=res.gpu, storage=res.storage
        ),
        env=dict(spec.env),
        metadata=_metadata(spec.metadata),
        create_time=_ts(challenge.create_time),
        update_time=_ts(challenge.update_time),
        revision=challenge.revision,
        create_revision=challenge.create_revision,
        token_issue_time=_ts(challenge.token_issue_time),
        status_reason=challenge.status_reason,
        status_time=_ts(challenge.status_time),
    )


def public_to_proto(challenge: Challenge) -> registry_pb2.PublicChallenge:
    spec = challenge.spec
    return registry_pb2.PublicChallenge(
        slug=spec.slug,
        name=spec.name,
        description=spec.description,
        emission_share=spec.emission_share,
        public_path=f"/challenges/{spec.slug}/",
        signed_path_prefixes=spec.routes.signed_path_prefixes,
        metadata=_metadata(spec.metadata),
    )


def status_from_proto(value: int) -> Status | None:
    try:
        return Status(value)
    except ValueError:
        return None
