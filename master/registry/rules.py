"""The registry's rules, as pure functions over plain data.

Everything a write must satisfy lives here: the shape of each field, the status
life cycle, the emission invariant and how an update mask applies. No I/O: the
store calls these inside its transaction, and tests call them directly.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from platform_common.refusals import FieldViolation, aborted, failed_precondition, invalid

Scalar = str | int | float | bool

PPB = 1_000_000_000  # emission shares are stored in parts per billion
SLUG_MAX = 40
NAME_MAX = 128
DESCRIPTION_MAX = 4096
IMAGE_MAX = 512
PREFIX_MAX_LEN = 256
PREFIX_MAX_COUNT = 32
ENV_MAX_ENTRIES = 64
ENV_VALUE_MAX = 4096
METADATA_VALUE_MAX = 512
RATE_LIMIT_MAX = 1_000_000
BODY_LIMIT_MAX = 1 << 30
TIMEOUT_MAX_SECONDS = 3600
GPU_MAX = 16
DEFAULT_METADATA_KEYS = frozenset(
    {"homepage", "repository", "documentation", "contact", "category", "version", "logo"}
)


class Status(enum.IntEnum):
    """Life cycle of a challenge; values equal the proto enum numbers."""

    DRAFT = 1
    ACTIVE = 2
    INACTIVE = 3
    DISABLED = 4


TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.DRAFT: frozenset({Status.ACTIVE, Status.DISABLED}),
    Status.ACTIVE: frozenset({Status.INACTIVE, Status.DISABLED}),
    Status.INACTIVE: frozenset({Status.ACTIVE, Status.DISABLED}),
    Status.DISABLED: frozenset({Status.INACTIVE}),
}


@dataclass(frozen=True)
class Routes:
    public_port: int = 0
    blocked_path_prefixes: tuple[str, ...] = ()
    signed_path_prefixes: tuple[str, ...] = ()
    rate_limit_per_hotkey_per_minute: int = 0
    rate_limit_per_ip_per_minute: int = 0
    max_request_body_bytes: int = 0
    request_timeout_seconds: int = 0


@dataclass(frozen=True)
class ResourceSpec:
    cpu: str = ""
    memory: str = ""
    gpu: int = 0
    storage: str = ""


@dataclass(frozen=True)
class Spec:
    """What a client sets on a challenge. ``emission_share`` as sent (a fraction)."""

    slug: str
    name: str = ""
    description: str = ""
    image: str = ""
    emission_share: float = 0.0
    routes: Routes = field(default_factory=Routes)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    env: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Scalar] = field(default_factory=dict)

    @property
    def share_ppb(self) -> int:
        return share_to_ppb(self.emission_share)


@dataclass(frozen=True)
class Challenge:
    """A stored challenge: its spec plus what the server maintains."""

    spec: Spec
    status: Status
    create_time: datetime
    update_time: datetime
    revision: int
    create_revision: int
    token_issue_time: datetime
    status_time: datetime
    status_reason: str = ""

    @property
    def slug(self) -> str:
        return self.spec.slug


@dataclass(frozen=True)
class Policy:
    """Deployment-wide rules: production strictness, image allowlist, metadata keys."""

    production: bool = False
    image_allowlist: tuple[str, ...] = ()
    metadata_keys: frozenset[str] = DEFAULT_METADATA_KEYS


# ---------------------------------------------------------------------------
# Field rules

_SLUG_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# OCI / distribution reference grammar (registry host, path components, tag, digest).
_HOST_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_RE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}))?",
    re.ASCII,
)
_SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")
_PATH_PREFIX_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_WORDS = ("SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "PRIVATE_KEY", "API_KEY")
_QUANTITY_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?")
_UNIT = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def slug_violation(slug: str, field_name: str = "slug") -> FieldViolation | None:
    if not slug:
        return FieldViolation(field_name, "is required")
    if len(slug) > SLUG_MAX or not _SLUG_RE.fullmatch(slug):
        return FieldViolation(
            field_name,
            "must be a DNS-1035 label: lowercase letters, digits and '-', starting with a "
            f"letter, not ending with '-', at most {SLUG_MAX} characters; got {slug!r}",
        )
    return None


def check_slug(slug: str, field_name: str = "slug") -> None:
    """Raise INVALID_ARGUMENT unless ``slug`` is a valid challenge slug."""
    violation = slug_violation(slug, field_name)
    if violation is not None:
        raise invalid([violation])


def share_to_ppb(share: float) -> int:
    return round(share * PPB)


def ppb_to_share(ppb: int) -> float:
    return ppb / PPB


def format_share(ppb: int) -> str:
    """A share for messages: up to 9 decimals, no trailing zeros ("0.35", "1")."""
    whole, frac = divmod(ppb, PPB)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def validate_spec(spec: Spec, policy: Policy, prefix: str = "challenge.") -> list[FieldViolation]:
    """Every rule a complete spec breaks, with request-relative field paths."""
    out: list[FieldViolation] = []
    slug = slug_violation(spec.slug, prefix + "slug")
    if slug is not None:
        out.append(slug)
    out += _text(prefix + "name", spec.name, NAME_MAX, required=True, multiline=False)
    out += _text(prefix + "description", spec.description, DESCRIPTION_MAX, multiline=True)
    out += image_violations(spec.image, policy, prefix + "image")
    out += _share(spec.emission_share, prefix + "emission_share")
    out += _routes(spec.routes, prefix + "routes")
    out += _resources(spec.resources, prefix + "resources")
    out += _env(spec.env, prefix + "env")
    out += _metadata(spec.metadata, policy, prefix + "metadata")
    return out


def check_spec(spec: Spec, policy: Policy, prefix: str = "challenge.") -> Spec:
    """Validate ``spec``; return it with its share rounded to the stored resolution."""
    violations = validate_spec(spec, policy, prefix)
    if violations:
        raise invalid(violations)
    return dataclasses.replace(spec, emission_share=ppb_to_share(spec.share_ppb))


def _text(
    name: str, value: str, limit: int, *, required: bool = False, multiline: bool
) -> list[FieldViolation]:
    if required and not value.strip():
        return [FieldViolation(name, "is required")]
    if len(value) > limit:
        return [FieldViolation(name, f"must be at most {limit} characters; got {len(value)}")]
    allowed = {"\n", "\r", "\t"} if multiline else set()
    for ch in value:
        if unicodedata.category(ch) == "Cc" and ch not in allowed:
            return [FieldViolation(name, f"must not contain control characters; got {ch!r}")]
    return []


def parse_image(image: str) -> re.Match[str] | None:
    if len(image) > IMAGE_MAX:
        return None
    return _IMAGE_RE.fullmatch(image)


def image_violations(image: str, policy: Policy, name: str = "image") -> list[FieldViolation]:
    if not image:
        return [FieldViolation(name, "is required")]
    match = parse_image(image)
    if match is None:
        return [
            FieldViolation(
                name,
                "must be an OCI image reference like registry.example/org/name:tag@sha256:<digest>"
                f"; got {image!r}",
            )
        ]
    if not policy.production:
        return []
    out = []
    digest = match.group("digest")
    if not match.group("tag") or not digest or not _SHA256_RE.fullmatch(digest):
        out.append(
            FieldViolation(
                name,
                "production mode requires a tag and a sha256 digest "
                f"(name:tag@sha256:<64 hex>); got {image!r}",
            )
        )
    repository = match.group("name")
    if not any(_under_namespace(repository, ns) for ns in policy.image_allowlist):
        allowed = ", ".join(policy.image_allowlist) or "(none configured)"
        out.append(
            FieldViolation(
                name,
                f"repository {repository!r} is not under an allowlisted namespace ({allowed})",
            )
        )
    return out


def _under_namespace(repository: str, namespace: str) -> bool:
    namespace = namespace.rstrip("/")
    return repository == namespace or repository.startswith(namespace + "/")


def _share(share: float, name: str) -> list[FieldViolation]:
    if not math.isfinite(share) or not 0.0 <= share <= 1.0:
        return [FieldViolation(name, f"must be a fraction between 0 and 1; got {share!r}")]
    return []


def _bounded(name: str, value: int, upper: int, lower: int = 0) -> list[FieldViolation]:
    if not lower <= value <= upper:
        return [FieldViolation(name, f"must be between {lower} and {upper}; got {value}")]
    return []


def _routes(routes: Routes, name: str) -> list[FieldViolation]:
    out = _bounded(name + ".public_port", routes.public_port, 65535)
    out += _prefixes(
        name + ".blocked_path_prefixes", routes.blocked_path_prefixes, allow_root=False
    )
    out += _prefixes(name + ".signed_path_prefixes", routes.signed_path_prefixes, allow_root=True)
    out += _bounded(
        name + ".rate_limit_per_hotkey_per_minute",
        routes.rate_limit_per_hotkey_per_minute,
        RATE_LIMIT_MAX,
    )
    out += _bounded(
        name + ".rate_limit_per_ip_per_minute", routes.rate_limit_per_ip_per_minute, RATE_LIMIT_MAX
    )
    out += _bounded(name + ".max_request_body_bytes", routes.max_request_body_bytes, BODY_LIMIT_MAX)
    out += _bounded(
        name + ".request_timeout_seconds", routes.request_timeout_seconds, TIMEOUT_MAX_SECONDS
    )
    return out


def _prefixes(name: str, prefixes: Sequence[str], *, allow_root: bool) -> list[FieldViolation]:
    if len(prefixes) > PREFIX_MAX_COUNT:
        return [
            FieldViolation(
                name, f"must have at most {PREFIX_MAX_COUNT} entries; got {len(prefixes)}"
            )
        ]
    out: list[FieldViolation] = []
    seen: set[str] = set()
    for i, prefix in enumerate(prefixes):
        item = f"{name}[{i}]"
        problem = _prefix_problem(prefix, allow_root=allow_root)
        if problem:
            out.append(FieldViolation(item, f"{problem}; got {prefix!r}"))
        elif prefix.lower() in seen:
            out.append(
                FieldViolation(
                    item, f"duplicates an earlier entry (case-insensitive); got {prefix!r}"
                )
            )
        seen.add(prefix.lower())
    return out


def _prefix_problem(prefix: str, *, allow_root: bool) -> str | None:
    if len(prefix) > PREFIX_MAX_LEN:
        return f"must be at most {PREFIX_MAX_LEN} characters"
    if not _PATH_PREFIX_RE.fullmatch(prefix):
        return (
            "must be a path starting with '/' made of unreserved URL characters "
            "(no '%', '?', '#', spaces)"
        )
    if prefix == "/":
        return None if allow_root else "must not be '/' (deactivate the challenge instead)"
    if prefix.endswith("/"):
        return "must not end with '/' (prefixes match whole path segments)"
    if any(segment in {"", ".", ".."} for segment in prefix[1:].split("/")):
        return "must not contain empty, '.' or '..' segments"
    return None


def _resources(res: ResourceSpec, name: str) -> list[FieldViolation]:
    out = []
    out += _quantity(name + ".cpu", res.cpu, ("1m", "256"), allow_milli=True)
    out += _quantity(name + ".memory", res.memory, ("16Mi", "4Ti"), allow_milli=False)
    out += _quantity(name + ".storage", res.storage, ("1Mi", "64Ti"), allow_milli=False)
    out += _bounded(name + ".gpu", res.gpu, GPU_MAX)
    return out


def parse_quantity(text: str) -> float | None:
    """A Kubernetes quantity ("500m", "2", "512Mi") as a number, or None if malformed."""
    match = _QUANTITY_RE.fullmatch(text)
    if match is None:
        return None
    return float(match.group("num")) * _UNIT[match.group("unit")]


def _quantity(
    name: str, text: str, bounds: tuple[str, str], *, allow_milli: bool
) -> list[FieldViolation]:
    if not text:
        return []
    value = parse_quantity(text)
    if value is None or (text.endswith("m") and not allow_milli):
        kind = "like '500m' or '2'" if allow_milli else "like '512Mi' or '4Gi'"
        return [FieldViolation(name, f"must be a Kubernetes quantity {kind}; got {text!r}")]
    lower, upper = (parse_quantity(b) or 0.0 for b in bounds)
    if not lower <= value <= upper:
        return [FieldViolation(name, f"must be between {bounds[0]} and {bounds[1]}; got {text!r}")]
    return []


def _env(env: Mapping[str, str], name: str) -> list[FieldViolation]:
    if len(env) > ENV_MAX_ENTRIES:
        return [
            FieldViolation(name, f"must have at most {ENV_MAX_ENTRIES} entries; got {len(env)}")
        ]
    out = []
    for key in sorted(env):
        item = f"{name}[{key!r}]"
        if not _ENV_KEY_RE.fullmatch(key):
            out.append(FieldViolation(item, "key must match [A-Za-z_][A-Za-z0-9_]*"))
        elif key.upper().startswith("PLATFORM_"):
            out.append(
                FieldViolation(item, "keys starting with PLATFORM_ are reserved for the platform")
            )
        elif any(word in key.upper() for word in _SECRET_WORDS):
            out.append(
                FieldViolation(
                    item,
                    "env is visible to operators and validators and must not carry secrets; "
                    "this key names one",
                )
            )
        elif len(env[key]) > ENV_VALUE_MAX:
            out.append(FieldViolation(item, f"value must be at most {ENV_VALUE_MAX} characters"))
        elif "\x00" in env[key]:
            out.append(FieldViolation(item, "value must not contain NUL"))
    return out


def _metadata(metadata: Mapping[str, Scalar], policy: Policy, name: str) -> list[FieldViolation]:
    out = []
    for key in sorted(metadata):
        item = f"{name}[{key!r}]"
        value = metadata[key]
        if key not in policy.metadata_keys:
            allowed = ", ".join(sorted(policy.metadata_keys))
            out.append(FieldViolation(item, f"key is not in the metadata allowlist ({allowed})"))
        elif isinstance(value, str) and len(value) > METADATA_VALUE_MAX:
            out.append(FieldViolation(item, f"must be at most {METADATA_VALUE_MAX} characters"))
        elif isinstance(value, str) and any(unicodedata.category(ch) == "Cc" for ch in value):
            out.append(FieldViolation(item, "must not contain control characters"))
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(FieldViolation(item, f"must be finite; got {value!r}"))
    return out


# ---------------------------------------------------------------------------
# Status life cycle and the emission invariant


STATUS_REASON_MAX = 512


def check_status_reason(reason: str) -> None:
    violations = _text("reason", reason, STATUS_REASON_MAX, multiline=False)
    if violations:
        raise invalid(violations)


def check_transition(slug: str, current: Status, target: Status) -> None:
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(s.name for s in sorted(TRANSITIONS[current]))
        raise failed_precondition(
            "STATUS_TRANSITION",
            f"challenges/{slug}",
            f"status: {slug!r} cannot go from {current.name} to {target.name} "
            f"(allowed from {current.name}: {allowed})",
        )


def check_emission(slug: str, others_active_ppb: Iterable[int], new_share_ppb: int) -> None:
    """Refuse if making ``slug`` ACTIVE with ``new_share_ppb`` pushes the ACTIVE sum over 1."""
    others = list(others_active_ppb)
    current = sum(others)
    if current + new_share_ppb > PPB:
        raise failed_precondition(
            "EMISSION_SUM",
            f"challenges/{slug}",
            f"emission_share: the sum over ACTIVE challenges would be "
            f"{format_share(current + new_share_ppb)}, over 1 (current sum "
            f"{format_share(current)} over {len(others)} other ACTIVE challenge(s), plus "
            f"{format_share(new_share_ppb)} for {slug!r})",
        )


def check_expected_revision(challenge: Challenge, expected: int) -> None:
    if expected and challenge.revision != expected:
        raise aborted(
            f"expected_revision: {challenge.slug!r} is at revision {challenge.revision}, "
            f"not {expected}; re-read it and retry",
        )


# ---------------------------------------------------------------------------
# Update masks

_TOP_FIELDS = (
    "name",
    "description",
    "image",
    "emission_share",
    "routes",
    "resources",
    "env",
    "metadata",
)
_ROUTE_FIELDS = tuple(f.name for f in dataclasses.fields(Routes))
_RESOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(ResourceSpec))
UPDATABLE_PATHS = frozenset(
    _TOP_FIELDS
    + tuple(f"routes.{f}" for f in _ROUTE_FIELDS)
    + tuple(f"resources.{f}" for f in _RESOURCE_FIELDS)
)
_MANAGED = {
    "slug": "is immutable",
    "status": "cannot be set here; use SetChallengeStatus",
    "token": "cannot be set here; use RotateChallengeToken",
    "revision": "is maintained by the server",
    "create_revision": "is maintained by the server",
    "create_time": "is maintained by the server",
    "update_time": "is maintained by the server",
    "token_issue_time": "is maintained by the server",
}


def check_mask(paths: Sequence[str]) -> tuple[str, ...]:
    """Validate an update mask; return its paths in a stable order."""
    if not paths:
        raise invalid([FieldViolation("update_mask", "must name at least one field to change")])
    out = []
    for i, path in enumerate(paths):
        if path in _MANAGED:
            raise invalid([FieldViolation(f"update_mask.paths[{i}]", f"{path!r} {_MANAGED[path]}")])
        if path not in UPDATABLE_PATHS:
            allowed = ", ".join(sorted(UPDATABLE_PATHS))
            raise invalid(
                [
                    FieldViolation(
                        f"update_mask.paths[{i}]", f"unknown field {path!r} (updatable: {allowed})"
                    )
                ]
            )
        out.append(path)
    return tuple(dict.fromkeys(out))


def apply_mask(current: Spec, patch: Spec, paths: Iterable[str]) -> Spec:
    """``current`` with the fields named by ``paths`` taken from ``patch``."""
    top: dict[str, Any] = {}
    routes: dict[str, Any] = {}
    resources: dict[str, Any] = {}
    for path in paths:
        head, _, sub = path.partition(".")
        if not sub:
            top[head] = getattr(patch, head)
        elif head == "routes":
            routes[sub] = getattr(patch.routes, sub)
        else:
            resources[sub] = getattr(patch.resources, sub)
    updated = dataclasses.replace(current, **top)
    if routes:
        updated = dataclasses.replace(updated, routes=dataclasses.replace(updated.routes, **routes))
    if resources:
        updated = dataclasses.replace(
            updated, resources=dataclasses.replace(updated.resources, **resources)
        )
    return updated


# ---------------------------------------------------------------------------
# Plain-data form, used for the event log and the snapshot columns


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    data = dataclasses.asdict(spec)
    data["emission_share_ppb"] = spec.share_ppb
    del data["emission_share"]
    data["routes"]["blocked_path_prefixes"] = list(spec.routes.blocked_path_prefixes)
    data["routes"]["signed_path_prefixes"] = list(spec.routes.signed_path_prefixes)
    data["env"] = dict(spec.env)
    data["metadata"] = dict(spec.metadata)
    return data


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    routes = dict(data.get("routes", {}))
    routes["blocked_path_prefixes"] = tuple(routes.get("blocked_path_prefixes", ()))
    routes["signed_path_prefixes"] = tuple(routes.get("signed_path_prefixes", ()))
    return Spec(
        slug=data["slug"],
        name=data.get("name", ""),
        description=data.get("description", ""),
        image=data.get("image", ""),
        emission_share=ppb_to_share(int(data.get("emission_share_ppb", 0))),
        routes=Routes(**routes),
        resources=ResourceSpec(**data.get("resources", {})),
        env=dict(data.get("env", {})),
        metadata=dict(data.get("metadata", {})),
    )


def challenge_to_dict(challenge: Challenge) -> dict[str, Any]:
    return {
        "spec": spec_to_dict(challenge.spec),
        "status": int(challenge.status),
        "create_time": challenge.create_time.isoformat(),
        "update_time": challenge.update_time.isoformat(),
        "revision": challenge.revision,
        "create_revision": challenge.create_revision,
        "token_issue_time": challenge.token_issue_time.isoformat(),
        "status_time": challenge.status_time.isoformat(),
        "status_reason": challenge.status_reason,
    }


def challenge_from_dict(data: Mapping[str, Any]) -> Challenge:
    return Challenge(
        spec=spec_from_dict(data["spec"]),
        status=Status(data["status"]),
        create_time=datetime.fromisoformat(data["create_time"]),
        update_time=datetime.fromisoformat(data["update_time"]),
        revision=int(data["revision"]),
        create_revision=int(data["create_revision"]),
        token_issue_time=datetime.fromisoformat(data["token_issue_time"]),
        status_time=datetime.fromisoformat(data["status_time"]),
        status_reason=data.get("status_reason", ""),
    )
