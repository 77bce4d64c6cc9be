"""A throwaway PostgreSQL server for the test session.

Real PostgreSQL binaries (Debian's ``postgresql`` package) run from a temporary
data directory on a free loopback port. ``initdb``/``pg_ctl`` refuse to run as
root, so as root they run inside a user namespace where the caller is mapped to
an ordinary uid (``unshare --user --map-user``).
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

import asyncpg

from tests.support.ports import free_port


def find_bin_dir() -> Path:
    override = os.environ.get("PLATFORM_TEST_PG_BIN")
    if override:
        return Path(override)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if found:
        return Path(found[0]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found; install Debian's 'postgresql' package "
        "(make setup does this) or set PLATFORM_TEST_PG_BIN"
    )


class PostgresServer:
    def __init__(self, root: Path, *, durable: bool = False) -> None:
        """``durable=False`` (tests) turns fsync and synchronous commits off for speed;
        ``durable=True`` keeps PostgreSQL's defaults, as a production server runs."""
        self.root = root
        self.durable = durable
        self.data = root / "data"
        self.port = free_port()
        self.bin = find_bin_dir()
        self._started = False

    def _cmd(self, tool: str, *args: str) -> list[str]:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            command = ["unshare", "--user", "--map-user=1000", "--map-group=1000", *command]
        return command

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        initdb = ["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        fast = not self.durable
        subprocess.run(
            self._cmd(*initdb, *(["--no-sync"] if fast else [])), check=True, capture_output=True
        )
        options = f"-p {self.port} -h 127.0.0.1 -k {self.root} -c max_connections=300"
        if fast:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        subprocess.run(
            self._cmd(
                "pg_ctl",
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.root / "log"),
                "-w",
                "start",
            ),
            check=True,
            capture_output=True,
        )
        self._started = True

    def stop(self) -> None:
        if self._started:
            subprocess.run(
                self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"),
                check=False,
                capture_output=True,
            )
            self._started = False

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    async def create_database(self, name: str, template: str | None = None) -> str:
        conn = await self._admin()
        try:
            suffix = f' TEMPLATE "{template}"' if template else ""
            await conn.execute(f'CREATE DATABASE "{name}"{suffix}')
        finally:
            await conn.close()
        return self.url(name)

    async def _admin(self) -> asyncpg.Connection:
        deadline = time.monotonic() + 10
        while True:
            try:
                return await asyncpg.connect(
                    host="127.0.0.1", port=self.port, user="postgres", database="postgres"
                )
            except (OSError, asyncpg.CannotConnectNowError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
