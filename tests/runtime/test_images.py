"""The dev image map (parsing, refusals, resolution) and the runtime spec's digest."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from platform_common.runtime import RuntimeSpec
from platform_common.runtime.images import ImageMapError, UnknownImage, load, parse, repository_of
from tests.runtime.support import HTTP, IMAGE_MAP, NATIVE, REPO, TOKEN

GOOD_ENTRY: dict[str, Any] = {
    "argv": ["{python}", "serve.py", "--internal", "{internal}", "--ready-file", "{ready_file}"],
    "transport": "grpc",
    "ready": {"internal": "internal"},
}


def entry(**changes: Any) -> dict[str, Any]:
    out = {**GOOD_ENTRY, **changes}
    return {k: v for k, v in out.items() if v is not None}


def parsed(images: Any, **top: Any) -> Any:
    return parse(json.dumps({"images": images, **top}), base=Path("/srv/maps"), source="map.json")


def test_the_example_map_runs_both_examples_from_the_repository() -> None:
    images = load(IMAGE_MAP)
    assert images.root == REPO
    native = images.resolve(f"{NATIVE}:1.0.0@sha256:{'a' * 64}")
    assert native.transport == "grpc"
    assert native.ready == {"internal": "internal", "public": "public"}
    command = native.command(
        python=sys.executable,
        root=str(images.root),
        slug="sum-bench",
        internal="127.0.0.1:7001",
        public="127.0.0.1:7002",
        ready_file="/run/ready.json",
    )
    assert command == [
        sys.executable,
        "examples/challenges/native/challenge.py",
        "--internal",
        "127.0.0.1:7001",
        "--public",
        "127.0.0.1:7002",
        "--ready-file",
        "/run/ready.json",
    ]
    assert (images.root / command[1]).is_file()
    http = images.resolve(HTTP)
    assert http.transport == "http"
    assert http.ready == {"internal": "listen", "public": "listen"}
    assert "{slug}" in http.argv
    assert (images.root / http.argv[1]).is_file()


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("ghcr.io/org/name:1.2.3", "ghcr.io/org/name"),
        ("ghcr.io/org/name@sha256:" + "b" * 64, "ghcr.io/org/name"),
        ("ghcr.io/org/name:1.2@sha256:" + "b" * 64, "ghcr.io/org/name"),
        ("localhost:5000/org/name", "localhost:5000/org/name"),
        ("localhost:5000/org/name:dev", "localhost:5000/org/name"),
        ("name", "name"),
    ],
)
def test_repository_drops_tag_and_digest(image: str, repository: str) -> None:
    assert repository_of(image) == repository


def test_root_is_relative_to_the_map_and_placeholders_are_substituted() -> None:
    images = parsed(
        {
            "registry.local:5000/team/bench": entry(
                argv=[
                    "{python}",
                    "{root}/bench.py",
                    "--slug={slug}",
                    "--public",
                    "{public}",
                    "--internal",
                    "{internal}",
                    "{{literal}}",
                ],
                ready=None,
                transport="http",
                env={"MODE": "dev"},
            )
        },
        root="../checkout",
    )
    assert images.root == Path("/srv/checkout")
    bench = images.resolve("registry.local:5000/team/bench:7")
    assert bench.ready is None
    assert bench.uses_public
    assert bench.env == {"MODE": "dev"}
    assert bench.command(
        python="py", root="/srv/checkout", slug="b", internal="h:1", public="h:2", ready_file="r"
    ) == [
        "py",
        "/srv/checkout/bench.py",
        "--slug=b",
        "--public",
        "h:2",
        "--internal",
        "h:1",
        "{literal}",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "map.json: not JSON: Expecting property name enclosed in double quotes at line 1"),
        ("[]", "map.json: must be a JSON object"),
        ('{"images": {}, "imagez": {}}', "map.json: unknown key 'imagez'; known: root, images"),
        ('{"images": []}', "map.json: images: must be an object repository -> entry; got array"),
        ('{"root": "", "images": {}}', "map.json: root: must be a non-empty path string"),
    ],
)
def test_refuses_a_malformed_file(text: str, message: str) -> None:
    with pytest.raises(ImageMapError) as info:
        parse(text, base=Path("/srv"), source="map.json")
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("repository", "raw", "message"),
    [
        (
            "ghcr.io/o/n:1.0",
            entry(),
            "images['ghcr.io/o/n:1.0']: must be an image repository without tag or digest",
        ),
        ("ghcr.io/o/n", ["python"], "images['ghcr.io/o/n']: must be an object with argv"),
        ("ghcr.io/o/n", entry(argv=[]), "images['ghcr.io/o/n'].argv: must be a non-empty list"),
        (
            "ghcr.io/o/n",
            entry(argv=["python", 3]),
            "images['ghcr.io/o/n'].argv[1]: must be a string; got number",
        ),
        (
            "ghcr.io/o/n",
            entry(argv=["x", "{internal}", "{ready_file}", "--port={port}"]),
            "images['ghcr.io/o/n'].argv[3]: unknown placeholder {port}; known: {python}, {root}, "
            "{slug}, {internal}, {public}, {ready_file}",
        ),
        (
            "ghcr.io/o/n",
            entry(argv=["x", "{internal!r}", "{ready_file}"]),
            "images['ghcr.io/o/n'].argv[1]: placeholders are plain names like {internal}",
        ),
        (
            "ghcr.io/o/n",
            entry(argv=["x", "{internal", "{ready_file}"]),
            "images['ghcr.io/o/n'].argv[1]: expected '}' before end of string (write {{ and }} "
            "for literal braces)",
        ),
        (
            "ghcr.io/o/n",
            entry(transport="tcp"),
            "images['ghcr.io/o/n'].transport: must be one of grpc, http",
        ),
        (
            "ghcr.io/o/n",
            entry(argv=["x", "{internal}"]),
            "images['ghcr.io/o/n'].argv: must pass {ready_file} to the challenge",
        ),
        (
            "ghcr.io/o/n",
            entry(ready=None, argv=["x", "{public}"]),
            "images['ghcr.io/o/n'].argv: must pass {internal}",
        ),
        (
            "ghcr.io/o/n",
            entry(ready={"internal": "a", "metrics": "m"}),
            "images['ghcr.io/o/n'].ready: unknown role 'metrics'; known: internal, public",
        ),
        (
            "ghcr.io/o/n",
            entry(ready={"public": "p"}),
            "images['ghcr.io/o/n'].ready.internal: required",
        ),
        (
            "ghcr.io/o/n",
            entry(ready={"internal": ""}),
            "images['ghcr.io/o/n'].ready.internal: must be the non-empty name of a key",
        ),
        (
            "ghcr.io/o/n",
            entry(env={"CHALLENGE_TOKEN": "x"}),
            "images['ghcr.io/o/n'].env['CHALLENGE_TOKEN']: set by the runtime itself",
        ),
        (
            "ghcr.io/o/n",
            entry(env={"platform_broker_addr": "x"}),
            "images['ghcr.io/o/n'].env['platform_broker_addr']: set by the runtime itself",
        ),
        ("ghcr.io/o/n", entry(env={"1X": "x"}), "images['ghcr.io/o/n'].env['1X']: key must match"),
        (
            "ghcr.io/o/n",
            entry(env={"X": 1}),
            "images['ghcr.io/o/n'].env['X']: value must be a string",
        ),
        (
            "ghcr.io/o/n",
            entry(workdir="/tmp"),
            "images['ghcr.io/o/n']: unknown key 'workdir'; known: description, argv, transport",
        ),
    ],
)
def test_refuses_a_bad_entry_naming_it(repository: str, raw: Any, message: str) -> None:
    with pytest.raises(ImageMapError) as info:
        parsed({repository: raw})
    assert str(info.value).startswith(f"map.json: {message}"), str(info.value)


def test_an_unknown_image_names_the_known_ones() -> None:
    images = parsed({"ghcr.io/o/known": entry()})
    with pytest.raises(UnknownImage) as info:
        images.resolve("ghcr.io/o/other:2")
    assert str(info.value) == (
        "image 'ghcr.io/o/other:2': repository 'ghcr.io/o/other' is not in map.json "
        "(known: ghcr.io/o/known)"
    )


def test_an_unreadable_map_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageMapError, match="cannot read the image map: No such file"):
        load(tmp_path / "absent.json")


def test_the_spec_digest_covers_everything_and_hides_the_token() -> None:
    spec = RuntimeSpec(slug="sum-bench", image=f"{NATIVE}:1", env={"A": "1"}, token=TOKEN)
    same = RuntimeSpec(slug="sum-bench", image=f"{NATIVE}:1", env={"A": "1"}, token=TOKEN)
    assert spec.digest() == same.digest()
    others = [
        RuntimeSpec(slug="sum-bench", image=f"{NATIVE}:2", env={"A": "1"}, token=TOKEN),
        RuntimeSpec(slug="sum-bench", image=f"{NATIVE}:1", env={"A": "2"}, token=TOKEN),
        RuntimeSpec(slug="sum-bench", image=f"{NATIVE}:1", env={"A": "1"}, token=TOKEN + "x"),
        RuntimeSpec(
            slug="sum-bench", image=f"{NATIVE}:1", env={"A": "1"}, token=TOKEN, public_port=8080
        ),
        RuntimeSpec(slug="sum-bench-2", image=f"{NATIVE}:1", env={"A": "1"}, token=TOKEN),
    ]
    assert len({spec.digest(), *(o.digest() for o in others)}) == 1 + len(others)
    assert TOKEN not in repr(spec)
    assert TOKEN not in spec.digest()
    with pytest.raises(TypeError):
        spec.env["A"] = "3"  # type: ignore[index]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"slug": "Bad_Slug"}, "slug: lowercase letters"),
        ({"image": ""}, "sum-bench: image is required"),
        ({"token": ""}, "sum-bench: token is required"),
        ({"public_port": 70000}, "sum-bench: public_port must be 0..65535; got 70000"),
    ],
)
def test_the_spec_refuses_what_cannot_run(fields: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"slug": "sum-bench", "image": NATIVE, "token": TOKEN, **fields}
    with pytest.raises(ValueError, match=message):
        RuntimeSpec(**values)
