"""Files the platform writes for other processes to read: ready files, state, secrets."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(
    path: Path, text: str, *, private: bool = False, durable: bool = False
) -> None:
    """Replace ``path`` with ``text`` in one step: a reader sees the old file or the new one,
    never a part. ``private``: mode 0600 from the start (secrets, tokens); ``durable``: on
    disk before the rename (state that must survive a crash of the machine)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
