"""From the registry and the placement file to the edge's input state."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from master.edge.model import EdgeLimits, EdgeSettings
from master.edge.state import build_state
from master.registry.rules import Challenge, Routes, Spec, Status
from master.weights.endpoints import ShimEndpointsFile

DEFAULTS = EdgeLimits(
    rate_per_hotkey_per_minute=600,
    rate_per_ip_per_minute=1200,
    max_request_body_bytes=1 << 20,
    request_timeout_seconds=30,
)
NOW = datetime(2026, 11, 22, tzinfo=UTC)


def challenge(slug: str, status: Status = Status.ACTIVE, **routes: object) -> Challenge:
    return Challenge(
        spec=Spec(slug=slug, routes=Routes(**routes)),  # type: ignore[arg-type]
        status=status,
        create_time=NOW,
        update_time=NOW,
        revision=1,
        create_revision=1,
        token_issue_time=NOW,
        status_time=NOW,
    )


def test_only_active_challenges_with_a_public_port_are_routed() -> None:
    state = build_state(
        [
            challenge("zeta", public_port=80),
            challenge("alpha", public_port=80, signed_path_prefixes=("/submit",)),
            challenge("draft", Status.DRAFT, public_port=80),
            challenge("inactive", Status.INACTIVE, public_port=80),
            challenge("private", public_port=0),
        ],
        {"alpha": "127.0.0.1:8001", "zeta": "challenge-zeta.svc:8000"},
        EdgeSettings(),
        DEFAULTS,
    )
    assert [c.slug for c in state.challenges] == ["alpha", "zeta"]
    alpha, zeta = state.challenges
    assert (alpha.upstream_host, alpha.upstream_port) == ("127.0.0.1", 8001)
    assert alpha.signed_path_prefixes == ("/submit",)
    assert (zeta.upstream_host, zeta.upstream_port) == ("challenge-zeta.svc", 8000)


def test_registry_limits_override_the_defaults_and_zero_means_default() -> None:
    [custom, default] = build_state(
        [
            challenge(
                "custom",
                public_port=80,
                rate_limit_per_hotkey_per_minute=5,
                rate_limit_per_ip_per_minute=6,
                max_request_body_bytes=7,
                request_timeout_seconds=8,
            ),
            challenge("default", public_port=80),
        ],
        {},
        EdgeSettings(),
        DEFAULTS,
    ).challenges
    assert custom.limits == EdgeLimits(5, 6, 7, 8)
    assert default.limits == DEFAULTS
    # Not placed yet: routed to no endpoint (the translator answers 503).
    assert (default.upstream_host, default.upstream_port) == ("", 0)


def test_equal_inputs_give_equal_states() -> None:
    inputs = ([challenge("a", public_port=80)], {"a": "127.0.0.1:1"}, EdgeSettings(), DEFAULTS)
    assert build_state(*inputs) == build_state(*inputs)
    assert build_state(*inputs) != build_state(
        *inputs[:2], replace(EdgeSettings(), listen_port=1), DEFAULTS
    )


async def test_the_placement_file_gives_shims_and_public_addresses(tmp_path: Path) -> None:
    path = tmp_path / "placement.json"
    path.write_text(
        json.dumps(
            {
                "a": "127.0.0.1:7001",
                "b": {"shim": "127.0.0.1:7002", "public": "127.0.0.1:8002"},
                "c": {"public": "127.0.0.1:8003"},
            }
        )
    )
    placement = ShimEndpointsFile(path)
    assert await placement.addresses() == {"a": "127.0.0.1:7001", "b": "127.0.0.1:7002"}
    assert await placement.public_addresses() == {"b": "127.0.0.1:8002", "c": "127.0.0.1:8003"}


@pytest.mark.parametrize(
    "entry",
    [{"public": "no-port"}, {"shim": 7}, {"other": "127.0.0.1:1"}, {}, ["127.0.0.1:1"]],
)
async def test_a_bad_placement_entry_keeps_the_last_good_file(
    tmp_path: Path, entry: object
) -> None:
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"a": {"public": "127.0.0.1:8001"}}))
    placement = ShimEndpointsFile(path)
    assert await placement.public_addresses() == {"a": "127.0.0.1:8001"}
    path.write_text(json.dumps({"a": entry, "b": "127.0.0.1:2"}))
    assert await placement.public_addresses() == {"a": "127.0.0.1:8001"}
    assert await placement.addresses() == {}
