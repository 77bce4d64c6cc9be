"""Precise refusals, independent of the transport.

Pure rules, stores and services raise :class:`Refusal`; the gRPC boundary
(:mod:`platform_common.status`) turns it into a status whose message names the
field and the rule, with the standard ``google.rpc`` details attached.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Kind(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNAVAILABLE = "UNAVAILABLE"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class Refusal(Exception):
    """A request refused for a stated reason; nothing was changed."""

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        violations: Iterable[FieldViolation] = (),
        precondition: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.violations = tuple(violations)
        #: (violation type, subject) for FAILED_PRECONDITION details.
        self.precondition = precondition


def invalid(violations: Iterable[FieldViolation]) -> Refusal:
    """INVALID_ARGUMENT listing every violation as "field: rule; field: rule"."""
    items = list(violations)
    return Refusal(Kind.INVALID_ARGUMENT, "; ".join(map(str, items)), violations=items)


def invalid_field(field: str, description: str) -> Refusal:
    return invalid([FieldViolation(field, description)])


def not_found(message: str) -> Refusal:
    return Refusal(Kind.NOT_FOUND, message)


def already_exists(message: str) -> Refusal:
    return Refusal(Kind.ALREADY_EXISTS, message)


def failed_precondition(kind: str, subject: str, message: str) -> Refusal:
    return Refusal(Kind.FAILED_PRECONDITION, message, precondition=(kind, subject))


def aborted(message: str) -> Refusal:
    return Refusal(Kind.ABORTED, message)


def permission_denied(message: str) -> Refusal:
    return Refusal(Kind.PERMISSION_DENIED, message)


def resource_exhausted(message: str) -> Refusal:
    return Refusal(Kind.RESOURCE_EXHAUSTED, message)
