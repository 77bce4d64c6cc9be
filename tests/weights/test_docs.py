"""The worked example in docs/weights.md: every number in its tables is checked against
the golden cases it cites, the allocation itself and the SDK's u16 conversion."""

from __future__ import annotations

import re
from pathlib import Path

from bittensor.intents.weights import normalize

from platform_common.weights import Outcome, allocate
from tests.weights.golden import GoldenCase, case_named

DOC = Path(__file__).resolve().parents[2] / "docs" / "weights.md"
BURN = "worked example, burn"
REDISTRIBUTE = "worked example, redistribute"


def table(name: str) -> list[list[str]]:
    """The body rows of the table between ``<!-- worked-example:NAME -->`` and
    ``<!-- /worked-example -->``."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(rf"<!-- worked-example:{name} -->\n(.*?)<!-- /worked-example -->", text, re.S)
    assert found, f"docs/weights.md has no worked-example:{name} table"
    lines = [line for line in found.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def run(case: GoldenCase) -> dict[int, float]:
    allocation = allocate(
        case.challenges, case.metagraph, burn_uid=case.burn_uid, policy=case.policy
    )
    assert [[u, w] for u, w in allocation.weights] == case.expected["weights"]
    return dict(allocation.weights)


def test_the_challenges_table() -> None:
    burn, redistribute = case_named(BURN), case_named(REDISTRIBUTE)
    assert burn.challenges == redistribute.challenges
    rows = table("challenges")
    assert [row[0] for row in rows] == [c.slug for c in burn.challenges]
    burn_results = allocate(
        burn.challenges, burn.metagraph, burn_uid=burn.burn_uid, policy=burn.policy
    ).challenges
    spread_results = allocate(
        redistribute.challenges,
        redistribute.metagraph,
        burn_uid=redistribute.burn_uid,
        policy=redistribute.policy,
    ).challenges
    for row, challenge, got_burn, got_spread in zip(
        rows, burn.challenges, burn_results, spread_results, strict=True
    ):
        slug, share, answer, outcome, applied_burn, applied_spread = row
        assert float(share) == challenge.share_ppb / 1e9, slug
        if challenge.scores is None:
            assert answer.startswith("("), slug
        else:
            listed = [part.rsplit(" ", 1) for part in answer.split(", ")]
            assert [(h, float(s)) for h, s in listed] == list(challenge.scores), slug
        assert Outcome[outcome] is got_burn.outcome is got_spread.outcome, slug
        assert float(applied_burn) == got_burn.share_applied, slug
        assert float(applied_spread) == got_spread.share_applied, slug


def test_the_weights_table() -> None:
    burn_case = case_named(BURN)
    burn, spread = run(burn_case), run(case_named(REDISTRIBUTE))
    rows = table("weights")
    uids = [int(row[0]) for row in rows]
    assert uids == sorted(burn) == sorted(spread)
    by_uid = {uid: hotkey for hotkey, uid in burn_case.metagraph.items()}
    burn_u16 = dict(zip(*normalize(uids, [burn[u] for u in uids]), strict=True))
    spread_u16 = dict(zip(*normalize(uids, [spread[u] for u in uids]), strict=True))
    for row in rows:
        uid = int(row[0])
        assert row[1] == by_uid[uid]
        assert float(row[2]) == burn[uid]
        assert int(row[3]) == burn_u16[uid]
        assert float(row[4]) == spread[uid]
        assert int(row[5]) == spread_u16[uid]
    assert sum(float(row[2]) for row in rows) == 1.0
    assert sum(float(row[4]) for row in rows) == 1.0
