"""The registry's pure rules (master/registry/rules.py): no I/O, no server."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from master.registry.rules import (
    PPB,
    TRANSITIONS,
    UPDATABLE_PATHS,
    Challenge,
    Policy,
    ResourceSpec,
    Routes,
    Scalar,
    Spec,
    Status,
    apply_mask,
    challenge_from_dict,
    challenge_to_dict,
    check_emission,
    check_expected_revision,
    check_mask,
    check_slug,
    check_spec,
    check_status_reason,
    check_transition,
    format_share,
    image_violations,
    ppb_to_share,
    share_to_ppb,
    slug_violation,
    spec_from_dict,
    spec_to_dict,
    validate_spec,
)
from platform_common.refusals import Kind, Refusal
from platform_network.v1 import registry_pb2

DEV = Policy()
DIGEST = "sha256:" + "0123456789abcdef" * 4
PROD = Policy(production=True, image_allowlist=("ghcr.io/org",))
VALID = Spec(slug="alpha", name="Alpha", image="ghcr.io/org/alpha:1.0.0", emission_share=0.25)


def with_fields(**changes: Any) -> Spec:
    return dataclasses.replace(VALID, **changes)


def with_routes(**changes: Any) -> Spec:
    return with_fields(routes=Routes(**changes))


def with_resources(**changes: Any) -> Spec:
    return with_fields(resources=ResourceSpec(**changes))


def refuse(spec: Spec, field: str, policy: Policy = DEV) -> Refusal:
    """check_spec must refuse ``spec`` with INVALID_ARGUMENT naming exactly ``field``."""
    with pytest.raises(Refusal) as info:
        check_spec(spec, policy)
    refusal = info.value
    assert refusal.kind is Kind.INVALID_ARGUMENT
    assert {v.field for v in refusal.violations} == {field}, refusal.message
    assert refusal.message.startswith(f"{field}: ")
    return refusal


def accept(spec: Spec, policy: Policy = DEV) -> Spec:
    assert validate_spec(spec, policy) == []
    return check_spec(spec, policy)


def test_the_baseline_spec_is_valid() -> None:
    assert accept(VALID) == VALID


def test_every_violation_is_reported_at_once() -> None:
    spec = with_fields(slug="Bad", image="not an image", emission_share=2.0)
    with pytest.raises(Refusal) as info:
        check_spec(spec, DEV)
    fields = [v.field for v in info.value.violations]
    assert fields == ["challenge.slug", "challenge.image", "challenge.emission_share"]
    assert info.value.message == "; ".join(str(v) for v in info.value.violations)


def test_field_paths_follow_the_prefix() -> None:
    with pytest.raises(Refusal) as info:
        check_spec(with_fields(name=""), DEV, prefix="")
    assert [v.field for v in info.value.violations] == ["name"]


# ---------------------------------------------------------------------------
# Slugs


@pytest.mark.parametrize(
    "slug", ["a", "alpha", "a-b", "a--b", "a1", "abc-123-def", "x9", "a" * 40, "a" + "-b" * 19]
)
def test_valid_slugs(slug: str) -> None:
    assert slug_violation(slug) is None
    check_slug(slug)
    accept(with_fields(slug=slug))


@pytest.mark.parametrize(
    "slug",
    [
        "Alpha",  # uppercase
        "alphA",
        "al_pha",  # underscore
        "1alpha",  # leading digit
        "-alpha",
        "alpha-",  # trailing '-'
        "a" * 41,  # one too long
        "al.pha",
        "al pha",
        "alphä",
        "alpha\n",
    ],
)
def test_invalid_slugs(slug: str) -> None:
    with pytest.raises(Refusal) as info:
        check_slug(slug)
    assert info.value.kind is Kind.INVALID_ARGUMENT
    assert info.value.message.startswith("slug: must be a DNS-1035 label")
    assert repr(slug) in info.value.message
    refusal = refuse(with_fields(slug=slug), "challenge.slug")
    assert "DNS-1035" in refusal.message


def test_empty_slug_is_required() -> None:
    with pytest.raises(Refusal) as info:
        check_slug("")
    assert info.value.kind is Kind.INVALID_ARGUMENT
    assert info.value.message == "slug: is required"
    refuse(with_fields(slug=""), "challenge.slug")


def test_check_slug_names_the_given_field() -> None:
    with pytest.raises(Refusal) as info:
        check_slug("Nope", "challenge.slug")
    assert [v.field for v in info.value.violations] == ["challenge.slug"]


# ---------------------------------------------------------------------------
# Name and description


@pytest.mark.parametrize("name", ["A", "Alpha Challenge", "x" * 128, "Ünïcode ✓"])
def test_valid_names(name: str) -> None:
    accept(with_fields(name=name))


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "is required"),
        ("   ", "is required"),
        ("x" * 129, "at most 128 characters"),
        ("two\nlines", "control characters"),
        ("tab\there", "control characters"),
        ("bell\x07", "control characters"),
    ],
)
def test_invalid_names(name: str, rule: str) -> None:
    assert rule in refuse(with_fields(name=name), "challenge.name").message


@pytest.mark.parametrize("description", ["", "x" * 4096, "line one\nline two\ttabbed"])
def test_valid_descriptions(description: str) -> None:
    accept(with_fields(description=description))


@pytest.mark.parametrize(
    ("description", "rule"),
    [("x" * 4097, "at most 4096 characters"), ("nul\x00", "control characters")],
)
def test_invalid_descriptions(description: str, rule: str) -> None:
    assert rule in refuse(with_fields(description=description), "challenge.description").message


# ---------------------------------------------------------------------------
# Image references


@pytest.mark.parametrize(
    "image",
    [
        "alpha",
        "org/alpha",
        "ghcr.io/org/alpha",
        "ghcr.io/org/alpha:1.0.0",
        "ghcr.io/org/team/alpha:v1_rc-2",
        "localhost:5000/org/alpha:latest",
        "registry.example.com:443/org/alpha:1.0@" + DIGEST,
        "ghcr.io/org/alpha@" + DIGEST,
        "ghcr.io/org/my_image.name-x:1",
        "ghcr.io/org/alpha:_tag",
        "ghcr.io/org/alpha:" + "t" * 128,
    ],
)
def test_valid_image_references(image: str) -> None:
    assert image_violations(image, DEV) == []
    accept(with_fields(image=image))


@pytest.mark.parametrize(
    "image",
    [
        "Ghcr.io/Org/Alpha",
        "ghcr.io/Org/alpha",  # uppercase repository
        "ghcr.io/org/alpha:",  # empty tag
        "ghcr.io/org/alpha:-1",  # tag starting with '-'
        "ghcr.io/org/alpha:" + "t" * 129,  # tag too long
        "ghcr.io/org//alpha",
        "ghcr.io/org/alpha/",
        "-alpha",
        "ghcr.io/org/alpha@sha256:abc",  # digest too short
        "ghcr.io/org/alpha@" + DIGEST + "x!",
        "ghcr.io/org/al pha",
        "https://ghcr.io/org/alpha",
        "ghcr.io/org/alpha:1.0 ",
        "ghcr.io/org/" + "a" * 510,  # over 512 characters
    ],
)
def test_invalid_image_references(image: str) -> None:
    refusal = refuse(with_fields(image=image), "challenge.image")
    assert "OCI image reference" in refusal.message


def test_image_is_required() -> None:
    assert refuse(with_fields(image=""), "challenge.image").message.endswith("is required")


@pytest.mark.parametrize("image", ["ghcr.io/org/alpha:vé", "ghcr.io/org/alpha:版本", "x:١٢"])
def test_non_ascii_tags_are_refused(image: str) -> None:
    refuse(with_fields(image=image), "challenge.image")


# ---------------------------------------------------------------------------
# Production image policy


@pytest.mark.parametrize(
    ("image", "allowlist"),
    [
        ("ghcr.io/org/alpha:1.0.0@" + DIGEST, ("ghcr.io/org",)),
        ("ghcr.io/org/team/alpha:1.0.0@" + DIGEST, ("ghcr.io/org",)),
        ("ghcr.io/org/alpha:1.0.0@" + DIGEST, ("ghcr.io/org/",)),
        ("ghcr.io/org/alpha:1.0.0@" + DIGEST, ("docker.io/other", "ghcr.io/org")),
        ("ghcr.io/org/alpha:1.0.0@" + DIGEST, ("ghcr.io/org/alpha",)),
        ("localhost:5000/org/alpha:1@" + DIGEST, ("localhost:5000/org",)),
    ],
)
def test_production_accepts_pinned_allowlisted_images(
    image: str, allowlist: tuple[str, ...]
) -> None:
    policy = Policy(production=True, image_allowlist=allowlist)
    assert image_violations(image, policy) == []
    accept(with_fields(image=image), policy)


@pytest.mark.parametrize(
    "image",
    [
        "ghcr.io/org/alpha:1.0.0",  # no digest
        "ghcr.io/org/alpha@" + DIGEST,  # no tag
        "ghcr.io/org/alpha",
        "ghcr.io/org/alpha:1.0.0@sha512:" + "ab" * 64,  # not sha256
        "ghcr.io/org/alpha:1.0.0@sha256:" + "AB" * 32,  # uppercase hex
    ],
)
def test_production_requires_a_tag_and_a_sha256_digest(image: str) -> None:
    refusal = refuse(with_fields(image=image), "challenge.image", PROD)
    assert "requires a tag and a sha256 digest" in refusal.message
    assert len(refusal.violations) == 1


@pytest.mark.parametrize(
    "repository",
    [
        "ghcr.io/org-evil/alpha",  # shares a prefix, not a segment
        "ghcr.io/organisation/alpha",
        "ghcr.io/orgx",
        "ghcr.io/other/org/alpha",
        "docker.io/org/alpha",
        "org/alpha",  # no registry host
        "evil.io/ghcr.io/org/alpha",
    ],
)
def test_production_allowlist_matches_whole_segments(repository: str) -> None:
    image = f"{repository}:1.0.0@{DIGEST}"
    refusal = refuse(with_fields(image=image), "challenge.image", PROD)
    assert f"repository {repository!r} is not under an allowlisted namespace" in refusal.message
    assert "(ghcr.io/org)" in refusal.message


def test_production_without_an_allowlist_refuses_every_image() -> None:
    policy = Policy(production=True)
    image = f"ghcr.io/org/alpha:1.0.0@{DIGEST}"
    assert (
        "(none configured)" in refuse(with_fields(image=image), "challenge.image", policy).message
    )


def test_production_reports_both_image_problems() -> None:
    violations = image_violations("ghcr.io/org-evil/alpha:1.0.0", PROD, "challenge.image")
    assert [v.field for v in violations] == ["challenge.image", "challenge.image"]
    assert "sha256 digest" in violations[0].description
    assert "allowlisted namespace" in violations[1].description


def test_development_ignores_the_allowlist_and_pinning() -> None:
    policy = Policy(production=False, image_allowlist=("ghcr.io/org",))
    assert image_violations("docker.io/elsewhere/alpha", policy) == []


# ---------------------------------------------------------------------------
# Emission share


@pytest.mark.parametrize("share", [0.0, -0.0, 1e-10, 0.5, 0.999999999, 1.0])
def test_valid_shares(share: float) -> None:
    accept(with_fields(emission_share=share))


@pytest.mark.parametrize(
    "share", [-0.1, -1e-12, 1.0000001, 1.5, 2.0, math.nan, math.inf, -math.inf]
)
def test_invalid_shares(share: float) -> None:
    refusal = refuse(with_fields(emission_share=share), "challenge.emission_share")
    assert "must be a fraction between 0 and 1" in refusal.message
    assert repr(share) in refusal.message


@pytest.mark.parametrize(
    ("share", "ppb"),
    [
        (0.0, 0),
        (1.0, PPB),
        (0.1, 100_000_000),
        (0.35, 350_000_000),
        (1 / 3, 333_333_333),
        (2 / 3, 666_666_667),
        (0.1234567894, 123_456_789),
        (0.1234567896, 123_456_790),
        (1e-9, 1),
        (4e-10, 0),
        (6e-10, 1),
    ],
)
def test_share_to_ppb_rounds_to_nearest(share: float, ppb: int) -> None:
    assert share_to_ppb(share) == ppb
    assert Spec(slug="a", emission_share=share).share_ppb == ppb
    assert ppb_to_share(ppb) == ppb / PPB


def test_check_spec_stores_the_share_at_ppb_resolution() -> None:
    checked = check_spec(with_fields(emission_share=0.1234567896), DEV)
    assert checked.emission_share == 0.12345679
    assert checked.share_ppb == 123_456_790
    assert checked == with_fields(emission_share=0.12345679)


@pytest.mark.parametrize(
    ("ppb", "text"),
    [
        (0, "0"),
        (1, "0.000000001"),
        (100_000_000, "0.1"),
        (350_000_000, "0.35"),
        (123_456_789, "0.123456789"),
        (PPB, "1"),
        (1_100_000_000, "1.1"),
        (2 * PPB + 5, "2.000000005"),
    ],
)
def test_format_share(ppb: int, text: str) -> None:
    assert format_share(ppb) == text


# ---------------------------------------------------------------------------
# Routes: path prefixes

PREFIX_FIELDS = ["blocked_path_prefixes", "signed_path_prefixes"]
GOOD_PREFIXES = [
    "/api",
    "/api/v1",
    "/API/V1",
    "/a.b",
    "/.well-known",
    "/~user",
    "/x-y_z",
    "/a:b@c",
    "/a;b=c,d",
    "/" + "a" * 255,  # 256 characters
]
BAD_PREFIXES = [
    ("", "must be a path starting with '/'"),
    ("api", "must be a path starting with '/'"),
    ("/a%20b", "no '%'"),
    ("/a?x", "must be a path starting with '/'"),
    ("/a#x", "must be a path starting with '/'"),
    ("/a b", "must be a path starting with '/'"),
    ("/é", "must be a path starting with '/'"),
    ("/a/", "must not end with '/'"),
    ("/api/v1/", "must not end with '/'"),
    ("//", "must not end with '/'"),
    ("//a", "empty, '.' or '..' segments"),
    ("/a//b", "empty, '.' or '..' segments"),
    ("/.", "empty, '.' or '..' segments"),
    ("/..", "empty, '.' or '..' segments"),
    ("/a/./b", "empty, '.' or '..' segments"),
    ("/a/../b", "empty, '.' or '..' segments"),
    ("/" + "a" * 256, "at most 256 characters"),
]


@pytest.mark.parametrize("which", PREFIX_FIELDS)
@pytest.mark.parametrize("prefix", GOOD_PREFIXES)
def test_valid_path_prefixes(which: str, prefix: str) -> None:
    accept(with_routes(**{which: ("/other", prefix)}))


@pytest.mark.parametrize("which", PREFIX_FIELDS)
@pytest.mark.parametrize(("prefix", "rule"), BAD_PREFIXES)
def test_invalid_path_prefixes(which: str, prefix: str, rule: str) -> None:
    refusal = refuse(with_routes(**{which: ("/ok", prefix)}), f"challenge.routes.{which}[1]")
    assert rule in refusal.message
    assert repr(prefix) in refusal.message


def test_root_is_allowed_only_for_signed_prefixes() -> None:
    accept(with_routes(signed_path_prefixes=("/",)))
    refusal = refuse(
        with_routes(blocked_path_prefixes=("/",)), "challenge.routes.blocked_path_prefixes[0]"
    )
    assert "must not be '/'" in refusal.message


@pytest.mark.parametrize("which", PREFIX_FIELDS)
@pytest.mark.parametrize(
    ("first", "second"), [("/api", "/api"), ("/api", "/API"), ("/A/b", "/a/B")]
)
def test_duplicate_prefixes_are_refused_case_insensitively(
    which: str, first: str, second: str
) -> None:
    spec = with_routes(**{which: (first, "/other", second)})
    refusal = refuse(spec, f"challenge.routes.{which}[2]")
    assert "duplicates an earlier entry (case-insensitive)" in refusal.message


@pytest.mark.parametrize("which", PREFIX_FIELDS)
def test_at_most_32_prefixes(which: str) -> None:
    prefixes = tuple(f"/p{i}" for i in range(33))
    accept(with_routes(**{which: prefixes[:32]}))
    refusal = refuse(with_routes(**{which: prefixes}), f"challenge.routes.{which}")
    assert "at most 32 entries; got 33" in refusal.message


def test_blocked_and_signed_prefixes_are_checked_independently() -> None:
    accept(with_routes(blocked_path_prefixes=("/admin",), signed_path_prefixes=("/admin",)))


# ---------------------------------------------------------------------------
# Routes: numbers

ROUTE_LIMITS = [
    ("public_port", 65535),
    ("rate_limit_per_hotkey_per_minute", 1_000_000),
    ("rate_limit_per_ip_per_minute", 1_000_000),
    ("max_request_body_bytes", 1 << 30),
    ("request_timeout_seconds", 3600),
]


@pytest.mark.parametrize(("name", "upper"), ROUTE_LIMITS)
def test_route_numbers_within_bounds(name: str, upper: int) -> None:
    accept(with_routes(**{name: 0}))
    accept(with_routes(**{name: upper}))


@pytest.mark.parametrize(("name", "upper"), ROUTE_LIMITS)
@pytest.mark.parametrize("delta", ["over", "negative"])
def test_route_numbers_out_of_bounds(name: str, upper: int, delta: str) -> None:
    value = upper + 1 if delta == "over" else -1
    refusal = refuse(with_routes(**{name: value}), f"challenge.routes.{name}")
    assert f"must be between 0 and {upper}; got {value}" in refusal.message


# ---------------------------------------------------------------------------
# Resources


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu", ""),
        ("cpu", "500m"),
        ("cpu", "1m"),
        ("cpu", "2"),
        ("cpu", "0.5"),
        ("cpu", "256"),
        ("cpu", "256000m"),
        ("memory", ""),
        ("memory", "512Mi"),
        ("memory", "4Gi"),
        ("memory", "1.5Gi"),
        ("memory", "1G"),
        ("memory", "4Ti"),
        ("storage", ""),
        ("storage", "10Gi"),
        ("storage", "64Ti"),
        ("gpu", 0),
        ("gpu", 16),
    ],
)
def test_valid_resources(field: str, value: str | int) -> None:
    accept(with_resources(**{field: value}))


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("cpu", "0", "must be between 1m and 256"),
        ("cpu", "257", "and 256;"),
        ("cpu", "256001m", "and 256;"),
        ("cpu", "1k", "and 256;"),
        ("cpu", "2Gi", "and 256;"),
        ("cpu", "-1", "Kubernetes quantity"),
        ("cpu", "1e3", "Kubernetes quantity"),
        ("cpu", " 1", "Kubernetes quantity"),
        ("cpu", "1.5.1", "Kubernetes quantity"),
        ("cpu", "m", "Kubernetes quantity"),
        ("cpu", "two", "Kubernetes quantity"),
        ("memory", "512m", "Kubernetes quantity"),  # milli-bytes make no sense
        ("memory", "4GB", "Kubernetes quantity"),
        ("memory", "0", "must be between 16Mi and 4Ti"),
        ("memory", "0.5", "must be between 16Mi and 4Ti"),
        ("storage", "512Ki", "must be between 1Mi and 64Ti"),
        ("memory", "5Ti", "must be between"),
        ("storage", "10gi", "Kubernetes quantity"),
        ("storage", "65Ti", "must be between"),
        ("gpu", 17, "must be between 0 and 16"),
        ("gpu", -1, "must be between 0 and 16"),
    ],
)
def test_invalid_resources(field: str, value: str | int, rule: str) -> None:
    refusal = refuse(with_resources(**{field: value}), f"challenge.resources.{field}")
    assert rule in refusal.message


# ---------------------------------------------------------------------------
# Environment


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LOG_LEVEL": "debug"},
        {"_PRIVATE": "", "a1": "x" * 4096},
        {"MODEL_NAME": "llama", "PLATFORMX": "not the reserved prefix"},
        {f"K{i}": str(i) for i in range(64)},
    ],
)
def test_valid_env(env: dict[str, str]) -> None:
    accept(with_fields(env=env))


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("1ABC", "x", "key must match"),
        ("A-B", "x", "key must match"),
        ("A B", "x", "key must match"),
        ("", "x", "key must match"),
        ("ÄPFEL", "x", "key must match"),
        ("PLATFORM_MODE", "x", "reserved for the platform"),
        ("platform_mode", "x", "reserved for the platform"),
        ("DB_PASSWORD", "x", "must not carry secrets"),
        ("db_passwd", "x", "must not carry secrets"),
        ("API_KEY", "x", "must not carry secrets"),
        ("openai_api_key", "x", "must not carry secrets"),
        ("GITHUB_TOKEN", "x", "must not carry secrets"),
        ("MY_SECRET", "x", "must not carry secrets"),
        ("AWS_CREDENTIALS", "x", "must not carry secrets"),
        ("SSH_PRIVATE_KEY", "x", "must not carry secrets"),
        ("BIG", "x" * 4097, "at most 4096 characters"),
        ("NUL", "a\x00b", "must not contain NUL"),
    ],
)
def test_invalid_env(key: str, value: str, rule: str) -> None:
    spec = with_fields(env={"OK": "fine", key: value})
    refusal = refuse(spec, f"challenge.env[{key!r}]")
    assert rule in refusal.message


def test_at_most_64_env_entries() -> None:
    env = {f"K{i}": str(i) for i in range(65)}
    refusal = refuse(with_fields(env=env), "challenge.env")
    assert "at most 64 entries; got 65" in refusal.message


# ---------------------------------------------------------------------------
# Metadata


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"homepage": "https://example.org", "version": 3, "category": "nlp"},
        {"logo": "x" * 512, "documentation": 1.5, "contact": True, "repository": ""},
    ],
)
def test_valid_metadata(metadata: dict[str, Scalar]) -> None:
    accept(with_fields(metadata=metadata))


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("twitter", "@x", "not in the metadata allowlist"),
        ("Homepage", "x", "not in the metadata allowlist"),
        ("homepage", "x" * 513, "at most 512 characters"),
        ("version", math.nan, "must be finite"),
        ("version", math.inf, "must be finite"),
        ("version", -math.inf, "must be finite"),
    ],
)
def test_invalid_metadata(key: str, value: Scalar, rule: str) -> None:
    spec = with_fields(metadata={"category": "ok", key: value})
    refusal = refuse(spec, f"challenge.metadata[{key!r}]")
    assert rule in refusal.message


def test_the_metadata_allowlist_comes_from_the_policy() -> None:
    policy = Policy(metadata_keys=frozenset({"team"}))
    accept(with_fields(metadata={"team": "x"}), policy)
    refusal = refuse(
        with_fields(metadata={"homepage": "x"}), "challenge.metadata['homepage']", policy
    )
    assert "(team)" in refusal.message


# ---------------------------------------------------------------------------
# Status life cycle

ALLOWED = {
    (Status.DRAFT, Status.ACTIVE),
    (Status.DRAFT, Status.DISABLED),
    (Status.ACTIVE, Status.INACTIVE),
    (Status.ACTIVE, Status.DISABLED),
    (Status.INACTIVE, Status.ACTIVE),
    (Status.INACTIVE, Status.DISABLED),
    (Status.DISABLED, Status.INACTIVE),
}
PAIRS = list(itertools.product(Status, Status))


def test_status_numbers_match_the_contract() -> None:
    for status in Status:
        number = registry_pb2.ChallengeStatus.Value(f"CHALLENGE_STATUS_{status.name}")
        assert int(number) == int(status)


def test_transition_table_matches_the_contract() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED


@pytest.mark.parametrize(
    ("current", "target"), [p for p in PAIRS if p in ALLOWED], ids=lambda s: s.name
)
def test_allowed_transitions(current: Status, target: Status) -> None:
    check_transition("alpha", current, target)


@pytest.mark.parametrize(
    ("current", "target"), [p for p in PAIRS if p not in ALLOWED], ids=lambda s: s.name
)
def test_refused_transitions(current: Status, target: Status) -> None:
    with pytest.raises(Refusal) as info:
        check_transition("alpha", current, target)
    refusal = info.value
    assert refusal.kind is Kind.FAILED_PRECONDITION
    assert refusal.message.startswith("status: ")
    assert f"from {current.name} to {target.name}" in refusal.message
    assert refusal.precondition == ("STATUS_TRANSITION", "challenges/alpha")


@pytest.mark.parametrize("reason", ["", "maintenance", "x" * 512, "naïve ✓"])
def test_valid_status_reasons(reason: str) -> None:
    check_status_reason(reason)


@pytest.mark.parametrize(
    ("reason", "rule"),
    [
        ("x" * 513, "at most 512 characters"),
        ("two\nlines", "control characters"),
        ("nul\x00", "control characters"),
    ],
)
def test_invalid_status_reasons(reason: str, rule: str) -> None:
    with pytest.raises(Refusal) as info:
        check_status_reason(reason)
    assert info.value.kind is Kind.INVALID_ARGUMENT
    assert [v.field for v in info.value.violations] == ["reason"]
    assert info.value.message.startswith("reason: ")
    assert rule in info.value.message


# ---------------------------------------------------------------------------
# Emission invariant


@pytest.mark.parametrize(
    ("others", "new"),
    [
        ([], 0),
        ([], PPB),
        ([PPB], 0),
        ([300_000_000, 200_000_000], 500_000_000),
        ([100_000_000] * 9, 100_000_000),
    ],
)
def test_emission_within_one_is_accepted(others: list[int], new: int) -> None:
    check_emission("alpha", others, new)


@pytest.mark.parametrize(
    ("others", "new", "current", "total"),
    [
        ([700_000_000], 400_000_000, "0.7", "1.1"),
        ([], PPB + 1, "0", "1.000000001"),
        ([PPB], 1, "1", "1.000000001"),
        ([250_000_000, 500_000_000], 300_000_000, "0.75", "1.05"),
    ],
)
def test_emission_over_one_names_the_current_sum(
    others: list[int], new: int, current: str, total: str
) -> None:
    with pytest.raises(Refusal) as info:
        check_emission("beta", iter(others), new)
    refusal = info.value
    assert refusal.kind is Kind.FAILED_PRECONDITION
    assert refusal.message.startswith("emission_share: ")
    assert f"current sum {current} " in refusal.message
    assert f"would be {total}, over 1" in refusal.message
    assert f"{len(others)} other ACTIVE" in refusal.message
    assert refusal.precondition == ("EMISSION_SUM", "challenges/beta")


def _stored(revision: int) -> Challenge:
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    return Challenge(
        spec=VALID,
        status=Status.DRAFT,
        create_time=now,
        update_time=now,
        revision=revision,
        create_revision=1,
        token_issue_time=now,
        status_time=now,
    )


@pytest.mark.parametrize("expected", [0, 7])
def test_expected_revision_matches(expected: int) -> None:
    check_expected_revision(_stored(7), expected)


def test_expected_revision_mismatch_is_aborted() -> None:
    with pytest.raises(Refusal) as info:
        check_expected_revision(_stored(7), 6)
    assert info.value.kind is Kind.ABORTED
    assert info.value.message.startswith("expected_revision: ")
    assert "revision 7, not 6" in info.value.message


# ---------------------------------------------------------------------------
# Update masks

CONTRACT_PATHS = [
    "name",
    "description",
    "image",
    "emission_share",
    "routes",
    "resources",
    "env",
    "metadata",
    "routes.public_port",
    "routes.blocked_path_prefixes",
    "routes.signed_path_prefixes",
    "routes.rate_limit_per_hotkey_per_minute",
    "routes.rate_limit_per_ip_per_minute",
    "routes.max_request_body_bytes",
    "routes.request_timeout_seconds",
    "resources.cpu",
    "resources.memory",
    "resources.gpu",
    "resources.storage",
]


def test_updatable_paths_are_the_contract_paths() -> None:
    assert frozenset(CONTRACT_PATHS) == UPDATABLE_PATHS


@pytest.mark.parametrize("path", CONTRACT_PATHS)
def test_every_contract_path_is_accepted(path: str) -> None:
    assert check_mask([path]) == (path,)


def test_mask_paths_keep_their_order_without_duplicates() -> None:
    assert check_mask(["env", "name", "env", "routes.public_port"]) == (
        "env",
        "name",
        "routes.public_port",
    )


def test_empty_mask_is_refused() -> None:
    with pytest.raises(Refusal) as info:
        check_mask([])
    assert info.value.kind is Kind.INVALID_ARGUMENT
    assert [v.field for v in info.value.violations] == ["update_mask"]
    assert info.value.message == "update_mask: must name at least one field to change"


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("slug", "is immutable"),
        ("status", "use SetChallengeStatus"),
        ("token", "use RotateChallengeToken"),
        ("revision", "maintained by the server"),
        ("create_revision", "maintained by the server"),
        ("create_time", "maintained by the server"),
        ("update_time", "maintained by the server"),
        ("token_issue_time", "maintained by the server"),
        ("bogus", "unknown field"),
        ("Name", "unknown field"),
        ("routes.bogus", "unknown field"),
        ("routes.", "unknown field"),
        ("resources.cpu.x", "unknown field"),
        ("resources.public_port", "unknown field"),
        ("env.LOG_LEVEL", "unknown field"),
        ("metadata.homepage", "unknown field"),
        ("challenge.name", "unknown field"),
        ("", "unknown field"),
    ],
)
def test_refused_mask_paths_name_the_offending_path(path: str, rule: str) -> None:
    with pytest.raises(Refusal) as info:
        check_mask(["name", path])
    refusal = info.value
    assert refusal.kind is Kind.INVALID_ARGUMENT
    assert [v.field for v in refusal.violations] == ["update_mask.paths[1]"]
    assert refusal.message.startswith("update_mask.paths[1]: ")
    assert repr(path) in refusal.message
    assert rule in refusal.message


CURRENT = Spec(
    slug="alpha",
    name="Alpha",
    description="old",
    image="ghcr.io/org/alpha:1",
    emission_share=0.2,
    routes=Routes(public_port=8080, blocked_path_prefixes=("/admin",), request_timeout_seconds=30),
    resources=ResourceSpec(cpu="1", memory="1Gi", gpu=1, storage="5Gi"),
    env={"A": "1", "B": "2"},
    metadata={"homepage": "https://a.example", "version": 1},
)
PATCH = Spec(
    slug="ignored",
    name="New",
    description="new",
    image="ghcr.io/org/alpha:2",
    emission_share=0.3,
    routes=Routes(public_port=9090, signed_path_prefixes=("/",)),
    resources=ResourceSpec(cpu="2"),
    env={"C": "3"},
    metadata={},
)


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        ([], CURRENT),
        (["name"], dataclasses.replace(CURRENT, name="New")),
        (
            ["description", "image"],
            dataclasses.replace(CURRENT, description="new", image=PATCH.image),
        ),
        (["emission_share"], dataclasses.replace(CURRENT, emission_share=0.3)),
        (["env"], dataclasses.replace(CURRENT, env={"C": "3"})),  # whole map, not merged
        (["metadata"], dataclasses.replace(CURRENT, metadata={})),
        (["routes"], dataclasses.replace(CURRENT, routes=PATCH.routes)),
        (
            ["routes.public_port"],
            dataclasses.replace(
                CURRENT, routes=dataclasses.replace(CURRENT.routes, public_port=9090)
            ),
        ),
        (
            ["routes.public_port", "routes.signed_path_prefixes"],
            dataclasses.replace(
                CURRENT,
                routes=dataclasses.replace(
                    CURRENT.routes, public_port=9090, signed_path_prefixes=("/",)
                ),
            ),
        ),
        (["resources"], dataclasses.replace(CURRENT, resources=ResourceSpec(cpu="2"))),
        (
            ["resources.cpu"],
            dataclasses.replace(CURRENT, resources=dataclasses.replace(CURRENT.resources, cpu="2")),
        ),
        (
            ["resources.gpu", "resources.storage"],
            dataclasses.replace(
                CURRENT, resources=dataclasses.replace(CURRENT.resources, gpu=0, storage="")
            ),
        ),
    ],
)
def test_apply_mask_takes_exactly_the_named_fields(paths: list[str], expected: Spec) -> None:
    updated = apply_mask(CURRENT, PATCH, paths)
    assert updated == expected
    assert updated.slug == "alpha"


# ---------------------------------------------------------------------------
# Plain-data form

FULL = Spec(
    slug="alpha",
    name="Alpha ✓",
    description="multi\nline",
    image="ghcr.io/org/alpha:1.0@" + DIGEST,
    emission_share=0.123456789,
    routes=Routes(
        public_port=8080,
        blocked_path_prefixes=("/admin", "/debug"),
        signed_path_prefixes=("/",),
        rate_limit_per_hotkey_per_minute=60,
        rate_limit_per_ip_per_minute=120,
        max_request_body_bytes=1 << 20,
        request_timeout_seconds=30,
    ),
    resources=ResourceSpec(cpu="500m", memory="512Mi", gpu=1, storage="10Gi"),
    env={"LOG_LEVEL": "debug", "EMPTY": ""},
    metadata={
        "homepage": "https://example.org",
        "version": 3,
        "documentation": 1.5,
        "contact": True,
    },
)


def test_spec_dict_round_trip() -> None:
    data = spec_to_dict(FULL)
    assert data["emission_share_ppb"] == 123_456_789
    assert "emission_share" not in data
    assert data["routes"]["blocked_path_prefixes"] == ["/admin", "/debug"]
    assert spec_from_dict(data) == FULL


def test_spec_dict_round_trip_through_json() -> None:
    restored = spec_from_dict(json.loads(json.dumps(spec_to_dict(FULL))))
    assert restored == FULL
    assert isinstance(restored.routes.signed_path_prefixes, tuple)
    assert type(restored.metadata["version"]) is int
    assert type(restored.metadata["documentation"]) is float
    assert type(restored.metadata["contact"]) is bool


def test_spec_from_a_minimal_dict_uses_defaults() -> None:
    assert spec_from_dict({"slug": "alpha"}) == Spec(slug="alpha")


def test_spec_dict_stores_the_share_rounded() -> None:
    data = spec_to_dict(Spec(slug="a", emission_share=0.1234567896))
    assert data["emission_share_ppb"] == 123_456_790
    assert spec_from_dict(data).emission_share == 0.12345679


def test_challenge_dict_round_trip() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    updated = datetime(2026, 2, 3, 4, 5, 6, 1, tzinfo=UTC)
    challenge = Challenge(
        spec=FULL,
        status=Status.INACTIVE,
        create_time=created,
        update_time=updated,
        revision=9,
        create_revision=2,
        token_issue_time=created,
        status_time=updated,
        status_reason="maintenance ✓",
    )
    data = json.loads(json.dumps(challenge_to_dict(challenge)))
    assert data["status"] == 3
    assert challenge_from_dict(data) == challenge
