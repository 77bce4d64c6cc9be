"""The whole subnet of ``make dev``: time to the first epoch on chain, validator idle cost.

Runs ``platform dev`` (chain, master with the local runtime and the Envoy edge, the two
example challenges, two validator agents) in a scratch directory, on the virtual
environment ``make dev`` has set up, and reports:

* the time from launching ``platform dev`` to the first line saying a validator
  submitted a sealed epoch on chain (the chain's tempo is 20 one-second blocks and the
  master seals 5 blocks before a tempo ends, so this includes waiting for the first
  tempo boundary);
* each validator agent's resident memory and CPU use over an idle window (streams
  open, nothing to submit between epochs most of the time).

    python -m bench.subnet [--idle-seconds N]
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    BenchTimeout,
    command_line,
    cpu_seconds,
    hard_timeout,
    machine,
    rss_mib,
    table,
)
from platform_common.ports import free_port
from tests.support.devnet import launch


def _validator_pids(state: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"validator" in argv and any(str(state).encode() in a for a in argv):
            pids.append(int(entry.name))
    return sorted(pids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    print(f"{command_line('bench.subnet', argv or sys.argv[1:])}\n{machine()}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-subnet-") as tmp:
        state = Path(tmp) / "state"
        started = time.monotonic()
        proc = launch(Path(tmp), state, free_port(), validators=2)
        marks: dict[str, float] = {}
        try:
            with hard_timeout(180 + args.idle_seconds):
                assert proc.stdout is not None
                for line in proc.stdout:
                    now = time.monotonic() - started
                    if "appear below as they happen" in line:
                        marks.setdefault("everything started (banner printed)", now)
                    elif re.search(r"epoch \d+ sealed", line):
                        marks.setdefault("first epoch sealed", now)
                    elif re.search(r"epoch \d+: validator \S+ submitted", line):
                        marks.setdefault("first epoch submitted on chain", now)
                        break
                else:
                    raise SystemExit(
                        f"bench.subnet: platform dev stopped before an epoch was submitted "
                        f"(milestones seen: {', '.join(marks) or 'none'})"
                    )
                pids = _validator_pids(state)
                if not pids:
                    raise SystemExit("no validator agent found")
                before = {pid: cpu_seconds(pid) for pid in pids}
                time.sleep(args.idle_seconds)
                usage = [
                    (
                        pid,
                        f"{rss_mib(pid):.1f}",
                        f"{100 * (cpu_seconds(pid) - before[pid]) / args.idle_seconds:.2f}",
                    )
                    for pid in pids
                ]
        except BenchTimeout as exc:
            raise SystemExit(f"bench.subnet: {exc}") from exc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    print(
        table(
            ["milestone", "seconds after `platform dev`"],
            [(k, f"{v:.1f}") for k, v in marks.items()],
        )
    )
    print()
    print(
        table(
            ["validator agent pid", "RSS MiB", f"CPU % over {args.idle_seconds:.0f} s idle"],
            usage,
        )
    )


if __name__ == "__main__":
    main()
