"""Layered configuration: defaults < config file < environment < command-line flags.

A component declares its settings once, as a frozen dataclass whose fields are made
with :func:`setting`. From that one declaration come the argparse options (so
``--help`` documents every option with its environment variable and default), the
environment variable names (``PLATFORM_<NAME>``) and the keys of the component's
section in the TOML configuration file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from platform_common.tokens import read_token_file

ENV_PREFIX = "PLATFORM_"

T = TypeVar("T")


class ConfigError(Exception):
    """A setting has a value that cannot be used; the message names the setting and its source."""


def setting(
    default: Any,
    help: str,
    *,
    flag: bool = True,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """Declare one setting of a configuration dataclass.

    ``flag=False`` keeps a setting off the command line (used for secrets, which
    would otherwise show up in process listings); it is still read from the
    environment and the configuration file.
    """
    if isinstance(default, list):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(
        default=default,
        metadata={"help": help, "flag": flag, "metavar": metavar, "choices": choices},
    )


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one option per flag-enabled setting of ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML configuration file (env {ENV_PREFIX}CONFIG). Settings are read from its "
        f"[{_section(cls)}] table; environment variables override it and flags override both.",
    )
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if not meta.get("flag", True):
            continue
        kind = hints[field.name]
        shown_default = _show(field.default)
        help_text = f"{meta['help']} (env {env_name(field.name)}; default: {shown_default})"
        if kind is bool:
            parser.add_argument(
                flag_name(field.name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(field.name),
                metavar=meta.get("metavar") or field.name.upper(),
                default=argparse.SUPPRESS,
                choices=meta.get("choices"),
                help=help_text,
            )


def env_only_help(cls: type[Any]) -> str:
    """Describe the settings that are read only from the environment or the file."""
    lines = [
        f"  {env_name(f.name)}: {f.metadata['help']}"
        for f in dataclasses.fields(cls)
        if not f.metadata.get("flag", True)
    ]
    return "settings read only from the environment or the config file:\n" + "\n".join(lines)


def load(
    cls: type[T],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from defaults, the config file, the environment and parsed flags."""
    environ = os.environ if environ is None else environ
    given = vars(args) if args is not None else {}
    hints = typing.get_type_hints(cls)
    config_path = given.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    file_values = _read_file(Path(config_path), _section(cls)) if config_path else {}
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(f"{config_path}: unknown setting(s) in [{_section(cls)}]: {unknown}")

    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[field.name]
        name = field.name
        if name in given:
            raw, source = given[name], flag_name(name)
        elif env_name(name) in environ:
            raw, source = environ[env_name(name)], env_name(name)
        elif name in file_values:
            raw, source = file_values[name], f"{config_path} [{_section(cls)}] {name}"
        else:
            continue
        values[name] = _coerce(raw, kind, source, field.metadata.get("choices"))
    return cls(**values)


def _section(cls: type[Any]) -> str:
    return str(getattr(cls, "SECTION", cls.__name__.lower()))


def _read_file(path: Path, section: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{section}] must be a table")
    return table


def _coerce(raw: Any, kind: Any, source: str, choices: tuple[str, ...] | None) -> Any:
    try:
        value = _coerce_kind(raw, kind)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    if choices is not None and value not in choices:
        raise ConfigError(f"{source}: must be one of {', '.join(choices)}; got {value!r}")
    return value


def _coerce_kind(raw: Any, kind: Any) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"expected a boolean (true/false); got {raw!r}")
    if kind is int:
        if isinstance(raw, bool):
            raise ValueError(f"expected an integer; got {raw!r}")
        return int(raw)
    if kind is float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number; got {raw!r}")
        return value
    if typing.get_origin(kind) is tuple:
        items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if kind is str:
        if not isinstance(raw, str | int | float):
            raise ValueError(f"expected a string; got {raw!r}")
        return str(raw)
    raise TypeError(f"unsupported setting type {kind!r}")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) if value else "(none)"
    if value == "":
        return "(none)"
    return str(value)


def join_host_port(host: str, port: int) -> str:
    """``HOST:PORT``, bracketing IPv6 literals (``[::1]:50051``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# The store drivers the master and the validator run on.
SQLITE_DRIVER = "sqlite+aiosqlite"
POSTGRES_DRIVER = "postgresql+asyncpg"


def check_database_url(url: str, *, production: bool = False) -> str:
    """The backend of a ``--database-url`` ("sqlite" or "postgresql"); a
    :class:`ConfigError` naming the flag otherwise. ``production`` refuses SQLite.

    Parsed by hand: SQLAlchemy costs a noticeable fraction of a second to import, which
    ``platform --help`` would pay.
    """
    driver, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"--database-url: expected DRIVER://...; got {url!r}")
    if driver == SQLITE_DRIVER:
        if production:
            raise ConfigError(
                "--database-url: production mode refuses SQLite; use a PostgreSQL URL "
                f"({POSTGRES_DRIVER}://user:password@host:5432/platform)"
            )
        if rest.removeprefix("/").partition("?")[0] in ("", ":memory:"):
            raise ConfigError(
                "--database-url: SQLite needs a file path (an in-memory database would be "
                "lost on restart and is not shared between connections)"
            )
        return "sqlite"
    if driver == POSTGRES_DRIVER:
        return "postgresql"
    raise ConfigError(
        f"--database-url: unsupported driver {driver!r}; use {SQLITE_DRIVER}:///PATH or "
        f"{POSTGRES_DRIVER}://..."
    )


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too); port 0 means pick a free one."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT with a port 0..65535; got {value!r}")
    return host.strip("[]"), int(port_text)


def secret_token(
    value: str, file: str, *, env: str, flag: str, what: str, min_length: int, hint: str
) -> str:
    """A bearer token given either in the environment (``env``) or in a file (``flag``).

    Refuses both at once, neither (with ``hint`` on how to get one), whitespace inside
    and fewer than ``min_length`` characters, each with a message naming the source.
    Surrounding whitespace is dropped: secrets written with ``echo token > file`` carry
    a newline, and clients never send one.
    """
    if value and file:
        raise ConfigError(f"set either {env} or {flag}, not both")
    if file:
        try:
            token = read_token_file(Path(file))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{flag}: {exc}") from exc
        source = flag
    elif value:
        token, source = value.strip(), env
    else:
        raise ConfigError(f"no {what}: set {env} or {flag} ({hint})")
    if any(ch.isspace() for ch in token):
        raise ConfigError(f"{source}: the {what} must not contain whitespace")
    if len(token) < min_length:
        raise ConfigError(f"{source}: the {what} must be at least {min_length} characters")
    return token
