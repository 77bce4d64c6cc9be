"""The dev image map: which local command stands for which challenge image.

The registry names every challenge by an OCI image. Kubernetes pulls and runs it;
the local runtime runs no containers, so in development an image repository maps to
a command on this machine (usually a Python entry point of a checked-out challenge).
The map is a JSON file::

    {
      "root": "..",
      "images": {
        "ghcr.io/platform-network/example-native": {
          "description": "Sum Bench on the SDK (gRPC)",
          "argv": ["{python}", "examples/challenges/native/challenge.py",
                   "--internal", "{internal}", "--public", "{public}",
                   "--ready-file", "{ready_file}"],
          "transport": "grpc",
          "ready": {"internal": "internal", "public": "public"},
          "env": {"PYTHONUNBUFFERED": "1"}
        }
      }
    }

* keys of ``images`` are repositories: the image reference without tag or digest,
  so ``ghcr.io/platform-network/example-native:1.0.0@sha256:...`` uses the entry above;
* ``root`` (default ``"."``) is relative to the map file's directory; commands run
  there, and ``{root}`` is its absolute path;
* ``argv`` placeholders: ``{python}`` (the interpreter running the runtime),
  ``{root}``, ``{slug}``, ``{internal}`` and ``{public}`` (HOST:PORT the runtime chose
  for ChallengeInternal and for the public API), ``{ready_file}``; ``{{`` and ``}}``
  are literal braces;
* ``transport``: how the shim reaches the challenge, ``grpc`` or ``http``;
* ``ready`` (optional): the challenge writes a JSON object to ``{ready_file}`` once
  serving, and these are the keys holding its ChallengeInternal (``internal``,
  required) and public (``public``) addresses. Without it, the challenge is ready
  when ``{internal}`` accepts TCP connections;
* ``env`` (optional): extra environment; the runtime's own variables
  (``CHALLENGE_TOKEN``, ``PLATFORM_*``) cannot be set here.

Parsing is pure and refuses a bad map with a message naming the entry and the rule.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLACEHOLDERS = ("python", "root", "slug", "internal", "public", "ready_file")
TRANSPORTS = ("grpc", "http")
READY_ROLES = ("internal", "public")
RESERVED_ENV = ("CHALLENGE_TOKEN",)
RESERVED_ENV_PREFIX = "PLATFORM_"
_ENTRY_KEYS = ("description", "argv", "transport", "ready", "env")
_TOP_KEYS = ("root", "images")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A repository: optional registry host (with port), then lowercase path components.
_REPOSITORY_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*",
    re.ASCII,
)


class ImageMapError(ValueError):
    """The image map cannot be used; the message names the entry and the rule."""


class UnknownImage(LookupError):
    """An image whose repository the map does not know."""


@dataclass(frozen=True)
class ImageEntry:
    """How to run one image repository locally."""

    repository: str
    argv: tuple[str, ...]
    transport: str
    ready: Mapping[str, str] | None
    env: Mapping[str, str]
    description: str = ""

    @property
    def uses_public(self) -> bool:
        """Whether the command is told a public address (``{public}``)."""
        return any("public" in _fields(arg) for arg in self.argv)

    def command(
        self, *, python: str, root: str, slug: str, internal: str, public: str, ready_file: str
    ) -> list[str]:
        """The argv with every placeholder replaced."""
        values = {
            "python": python,
            "root": root,
            "slug": slug,
            "internal": internal,
            "public": public,
            "ready_file": ready_file,
        }
        return [arg.format_map(values) for arg in self.argv]


@dataclass(frozen=True)
class ImageMap:
    """The parsed map: repositories and the directory commands run in."""

    root: Path
    entries: Mapping[str, ImageEntry]
    source: str = "image map"

    def resolve(self, image: str) -> ImageEntry:
        """The entry for ``image`` (any tag or digest); :class:`UnknownImage` otherwise."""
        repository = repository_of(image)
        entry = self.entries.get(repository)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise UnknownImage(
                f"image {image!r}: repository {repository!r} is not in {self.source} "
                f"(known: {known})"
            )
        return entry


def repository_of(image: str) -> str:
    """``registry/org/name:tag@sha256:...`` -> ``registry/org/name``."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return name


def load(path: Path) -> ImageMap:
    """Read and parse the map at ``path``; :class:`ImageMapError` names what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageMapError(f"{path}: cannot read the image map: {exc.strerror or exc}") from exc
    return parse(text, base=path.resolve().parent, source=str(path))


def parse(text: str, *, base: Path, source: str = "image map") -> ImageMap:
    """Parse the map's JSON ``text``; ``root`` is resolved against ``base``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImageMapError(
            f"{source}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    if not isinstance(data, dict):
        raise ImageMapError(
            f'{source}: must be a JSON object {{"root": ..., "images": {{...}}}}; got {_kind(data)}'
        )
    _only(data, _TOP_KEYS, source)
    root_text = data.get("root", ".")
    if not isinstance(root_text, str) or not root_text:
        raise ImageMapError(f"{source}: root: must be a non-empty path string")
    images = data.get("images")
    if not isinstance(images, dict):
        raise ImageMapError(
            f"{source}: images: must be an object repository -> entry; got {_kind(images)}"
        )
    entries = {}
    for repository, raw in images.items():
        where = f"{source}: images[{repository!r}]"
        if not _REPOSITORY_RE.fullmatch(repository):
            raise ImageMapError(
                f"{where}: must be an image repository without tag or digest, like ghcr.io/org/name"
            )
        entries[repository] = _entry(repository, raw, where)
    return ImageMap(root=(base / root_text).resolve(), entries=entries, source=source)


def _entry(repository: str, raw: Any, where: str) -> ImageEntry:
    if not isinstance(raw, dict):
        raise ImageMapError(f"{where}: must be an object with argv and transport")
    _only(raw, _ENTRY_KEYS, where)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ImageMapError(f"{where}.description: must be a string")
    argv = raw.get("argv")
    if not isinstance(argv, list) or not argv:
        raise ImageMapError(f"{where}.argv: must be a non-empty list of strings")
    used: set[str] = set()
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise ImageMapError(f"{where}.argv[{i}]: must be a string; got {_kind(arg)}")
        try:
            fields = _fields(arg)
        except ValueError as exc:
            raise ImageMapError(
                f"{where}.argv[{i}]: {exc} (write {{{{ and }}}} for literal braces); got {arg!r}"
            ) from exc
        for name in fields:
            if name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise ImageMapError(
                    f"{where}.argv[{i}]: unknown placeholder {{{name}}}; known: {known}"
                )
        used |= fields
    transport = raw.get("transport")
    if transport not in TRANSPORTS:
        raise ImageMapError(f"{where}.transport: must be one of {', '.join(TRANSPORTS)}")
    ready = _ready(raw.get("ready"), where)
    if ready is not None and "ready_file" not in used:
        raise ImageMapError(
            f"{where}.argv: must pass {{ready_file}} to the challenge, since ready names the "
            "keys it writes there"
        )
    if ready is None and "internal" not in used:
        raise ImageMapError(
            f"{where}.argv: must pass {{internal}} (the address to serve ChallengeInternal on), "
            "or the challenge must report it through ready"
        )
    env = _env(raw.get("env", {}), where)
    return ImageEntry(
        repository=repository,
        argv=tuple(argv),
        transport=str(transport),
        ready=ready,
        env=env,
        description=description,
    )


def _ready(raw: Any, where: str) -> Mapping[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ImageMapError(
            f'{where}.ready: must be an object like {{"internal": "<key>", "public": "<key>"}}'
        )
    for role, key in raw.items():
        if role not in READY_ROLES:
            raise ImageMapError(
                f"{where}.ready: unknown role {role!r}; known: {', '.join(READY_ROLES)}"
            )
        if not isinstance(key, str) or not key:
            raise ImageMapError(f"{where}.ready.{role}: must be the non-empty name of a key")
    if "internal" not in raw:
        raise ImageMapError(
            f"{where}.ready.internal: required (the ready-file key holding the address of "
            "ChallengeInternal)"
        )
    return dict(raw)


def _env(raw: Any, where: str) -> Mapping[str, str]:
    if not isinstance(raw, dict):
        raise ImageMapError(f"{where}.env: must be an object of strings")
    for key, value in raw.items():
        item = f"{where}.env[{key!r}]"
        if not _ENV_KEY_RE.fullmatch(key):
            raise ImageMapError(f"{item}: key must match [A-Za-z_][A-Za-z0-9_]*")
        if key in RESERVED_ENV or key.upper().startswith(RESERVED_ENV_PREFIX):
            raise ImageMapError(
                f"{item}: set by the runtime itself (CHALLENGE_TOKEN and PLATFORM_* are reserved)"
            )
        if not isinstance(value, str) or "\x00" in value:
            raise ImageMapError(f"{item}: value must be a string without NUL")
    return dict(raw)


def _fields(arg: str) -> set[str]:
    """Placeholder names in ``arg``; ValueError for malformed or formatted ones."""
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(arg):
        if name is None:
            continue
        if not name or spec or conversion:
            raise ValueError("placeholders are plain names like {internal}")
        names.add(name)
    return names


def _only(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ImageMapError(f"{where}: unknown key {key!r}; known: {', '.join(allowed)}")


def _kind(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
