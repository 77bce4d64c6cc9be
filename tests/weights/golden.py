"""The hand-computed golden allocations in golden_vectors.json, as typed cases."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from platform_common.weights import PPB, ChallengeInput, Policy

GOLDEN_FILE = Path(__file__).with_name("golden_vectors.json")


@dataclass(frozen=True)
class GoldenCase:
    name: str
    policy: Policy
    burn_uid: int
    metagraph: dict[str, int]
    challenges: list[ChallengeInput]
    expected: dict[str, Any]
    # None: every expected number is exact and compared with ==.
    rel_tol: float | None


def load_cases() -> list[GoldenCase]:
    data = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))
    cases = []
    for raw in data["cases"]:
        challenges = [
            ChallengeInput(
                slug=c["slug"],
                share_ppb=c["share_ppb"],
                scores=None
                if c["scores"] is None
                else [(hotkey, float(score)) for hotkey, score in c["scores"]],
            )
            for c in raw["challenges"]
        ]
        assert sum(c.share_ppb for c in challenges) <= PPB, raw["name"]
        cases.append(
            GoldenCase(
                name=raw["name"],
                policy=Policy(raw["policy"]),
                burn_uid=raw["burn_uid"],
                metagraph=raw["metagraph"],
                challenges=challenges,
                expected=raw["expected"],
                rel_tol=raw.get("rel_tol"),
            )
        )
    return cases


def case_named(name: str) -> GoldenCase:
    for case in load_cases():
        if case.name == name:
            return case
    raise KeyError(name)
