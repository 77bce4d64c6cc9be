"""docs/runtime.md says what the code does: the image map it shows is the shipped one, and
its tables name every placeholder, state, variable and default the runtime has."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from platform_common.runtime import InstanceState
from platform_common.runtime.images import PLACEHOLDERS, ImageMapError, parse
from platform_common.runtime.local import PASSTHROUGH_ENV, LocalRuntime
from tests.runtime.support import IMAGE_MAP, REPO

GUIDE = (REPO / "docs" / "runtime.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE, flags=re.DOTALL)


def test_the_map_shown_is_the_shipped_one() -> None:
    (shown,) = blocks("json")
    assert json.loads(shown) == json.loads(IMAGE_MAP.read_text())


def test_every_placeholder_and_state_is_described() -> None:
    placeholders = re.findall(r"^\| `\{(\w+)\}` \|", GUIDE, flags=re.MULTILINE)
    assert placeholders == list(PLACEHOLDERS)
    states = re.findall(r"^\| `([A-Z]+)` \|", GUIDE, flags=re.MULTILINE)
    assert states == [s.value for s in InstanceState]


def test_the_inherited_variables_are_the_ones_listed() -> None:
    sentence = re.search(r"They get (.*?) when set", GUIDE, flags=re.DOTALL)
    assert sentence is not None
    assert re.findall(r"`(\w+)`", sentence.group(1)) == list(PASSTHROUGH_ENV)


def test_the_defaults_quoted_are_the_runtimes() -> None:
    defaults = {
        name: p.default for name, p in inspect.signature(LocalRuntime.__init__).parameters.items()
    }
    for name in ("backoff_initial", "backoff_max", "stable_after", "start_timeout", "grace"):
        quoted = re.search(rf"`{name}` \(([0-9.]+) s\)", " ".join(GUIDE.split()))
        assert quoted is not None, name
        assert float(quoted.group(1)) == defaults[name], name
    assert defaults["max_log_bytes"] == 16 * 1024 * 1024
    assert "larger than 16 MiB" in GUIDE


def test_the_refusal_quoted_is_the_one_given() -> None:
    bad = {
        "images": {"ghcr.io/o/n": {"argv": ["a", "{internal}", "b", "{port}"], "transport": "grpc"}}
    }
    with pytest.raises(ImageMapError) as info:
        parse(json.dumps(bad), base=Path("/srv"), source="images.json")
    assert str(info.value) in " ".join(GUIDE.split())
