"""The grpcurl examples of docs/operators.md, run with the real grpcurl against a real master.

Convention (documented in the guide): every ```sh block that contains ``grpcurl``
is run, in document order, through ``bash -c`` from the repository root with
``ADDR``, ``AUTH`` and ``PLATFORM_ADMIN_TOKEN`` set. It must exit 0, unless the
line directly above its opening fence is ``<!-- expect: CODE -->``: then it must
end with that gRPC status, i.e. exit with grpcurl's status 64 + code and print
``Code: CODE`` on standard error.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from platform_network.v1 import registry_pb2
from tests.support.master import ADMIN_TOKEN, VENV_BIN, MasterProcess, epoch_master_process

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "operators.md"
REGISTRY_RPCS = tuple(m.name for m in registry_pb2.DESCRIPTOR.services_by_name["Registry"].methods)

# A marker is a line of its own; the guide quotes it inline when explaining it.
_EXPECT = re.compile(r"\s*<!--\s*expect:\s*([A-Za-z]+)\s*-->\s*")
_CALL = re.compile(
    r"(?:platform_network\.v1\.(?:Registry|Weights)|grpc\.health\.v1\.Health)/(?P<method>\w+)"
    r"|\bdescribe\s+(?P<symbol>[\w.]+)"
    r"|\$ADDR\s+(?P<list>list)\b"
)
_REGISTRY_CALL = re.compile(r"platform_network\.v1\.Registry/(\w+)")
_STATUS_REQUEST = re.compile(r'"status": "(CHALLENGE_STATUS_\w+)"')
OK = "OK"
GRPCURL_STATUS_BASE = 64  # grpcurl exits with 64 + the numeric gRPC code


def _go_code_name(code: grpc.StatusCode) -> str:
    """grpcurl's (Go's) name of a status code: INVALID_ARGUMENT -> InvalidArgument."""
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(word.capitalize() for word in code.name.split("_"))


GRPC_CODES: dict[str, int] = {
    _go_code_name(code): int(code.value[0]) for code in grpc.StatusCode if code.value[0]
}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence in the guide
    code: str
    expect: str  # OK, or grpcurl's name of the status the block must end with

    @property
    def call(self) -> str:
        """The last thing the block asks grpcurl for: "Registry/X", "describe Y" or "list"."""
        matches = list(_CALL.finditer(self.code))
        assert matches, f"block at line {self.line} calls nothing grpcurl can be checked on"
        last = matches[-1]
        if last["method"]:
            service = last[0].split("/")[0].rsplit(".", 1)[-1]
            return f"{service}/{last['method']}"
        if last["symbol"]:
            return f"describe {last['symbol']}"
        return "list"


@dataclass(frozen=True)
class Expect:
    """What a block's output must (not) contain, by the call it makes and its outcome."""

    stdout: tuple[str, ...] = ()
    stdout_not: tuple[str, ...] = ()
    stderr: tuple[str, ...] = ()


CHECKS: dict[tuple[str, str], Expect] = {
    ("list", OK): Expect(
        stdout=(
            "grpc.health.v1.Health",
            "platform_network.v1.Registry",
            "platform_network.v1.Weights",
            "platform_network.v1.Broker",
        )
    ),
    ("describe platform_network.v1.Registry", OK): Expect(
        stdout=("is a service", "AUTH_POLICY_PUBLIC", *(f"rpc {name} " for name in REGISTRY_RPCS))
    ),
    ("describe platform_network.v1.CreateChallengeRequest", OK): Expect(
        stdout=("is a message", "Message template", '"emission_share"', '"public_port"')
    ),
    ("describe platform_network.v1.ChallengeInternal", OK): Expect(
        stdout=("service ChallengeInternal", "rpc GetWeights", "rpc Health", "rpc GetInfo")
    ),
    ("Health/Check", OK): Expect(stdout=('"status": "SERVING"',)),
    ("Registry/CreateChallenge", OK): Expect(
        stdout=('"token": "pct_', '"status": "CHALLENGE_STATUS_DRAFT"', '"create_revision"')
    ),
    ("Registry/CreateChallenge", "AlreadyExists"): Expect(stderr=("prompt-golf",)),
    ("Registry/CreateChallenge", "InvalidArgument"): Expect(
        stderr=("challenge.slug", "DNS-1035", "google.rpc.BadRequest")
    ),
    ("Registry/GetChallenge", OK): Expect(
        stdout=('"slug": "term-bench"', '"image": "ghcr.io/', '"env"'), stdout_not=('"token":',)
    ),
    ("Registry/GetChallenge", "NotFound"): Expect(stderr=("term-bench",)),
    ("Registry/GetChallenge", "Unauthenticated"): Expect(stderr=("missing credentials",)),
    ("Registry/ListChallenges", OK): Expect(
        stdout=('"slug": "prompt-golf"', '"slug": "term-bench"', '"next_page_token"'),
        stdout_not=("CHALLENGE_STATUS_ACTIVE",),
    ),
    ("Registry/UpdateChallenge", OK): Expect(
        stdout=('"emission_share": 0.4', '"rate_limit_per_ip_per_minute": 120')
    ),
    ("Registry/SetChallengeStatus", OK): Expect(stdout=('"slug": "term-bench"',)),
    ("Registry/SetChallengeStatus", "FailedPrecondition"): Expect(
        stderr=("google.rpc.PreconditionFailure",)
    ),
    ("Registry/ListPublicChallenges", OK): Expect(
        stdout=('"slug": "term-bench"', '"public_path": "/challenges/term-bench/"'),
        stdout_not=('"image"', '"env"', '"resources"', "prompt-golf", '"token'),
    ),
    ("Registry/WatchRegistry", "DeadlineExceeded"): Expect(
        stdout=('"cursor"', '"server_epoch"', '"history_id"')
    ),
    ("Registry/RotateChallengeToken", OK): Expect(
        stdout=('"token": "pct_', '"slug": "term-bench"')
    ),
    ("Registry/DeleteChallenge", OK): Expect(stdout=('"revision"',)),
    ("Weights/GetLatestWeights", OK): Expect(
        stdout=('"epoch": "1"', '"chain_weights"', '"signature"', '"master_hotkey"')
    ),
    ("Weights/GetEpoch", OK): Expect(stdout=('"vector"', '"metagraph_neurons": 8')),
    ("Weights/GetEpoch", "NotFound"): Expect(stderr=("epoch 999",)),
    ("Weights/ListSubmissions", OK): Expect(),
}


def guide_blocks(text: str) -> list[Block]:
    """Every ```sh block of the guide that contains grpcurl, in document order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        marker = _EXPECT.fullmatch(lines[i])
        if marker is not None:
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            assert following == "```sh", (
                f"docs/operators.md:{i + 1}: an expect marker must sit on the line directly "
                f"above a ```sh fence"
            )
            assert marker[1] in GRPC_CODES, (
                f"docs/operators.md:{i + 1}: {marker[1]!r} is not a grpcurl status name "
                f"({', '.join(sorted(GRPC_CODES))})"
            )
        if lines[i].strip() != "```sh":
            i += 1
            continue
        start = i
        end = start + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"docs/operators.md:{start + 1}: unclosed ```sh block"
        code = "\n".join(lines[start + 1 : end]) + "\n"
        if "grpcurl" in code:
            above = _EXPECT.fullmatch(lines[start - 1]) if start else None
            blocks.append(Block(start + 1, code, above[1] if above else OK))
        i = end + 1
    return blocks


def test_guide_blocks_follow_the_convention() -> None:
    blocks = guide_blocks(GUIDE.read_text())
    assert len(blocks) >= len(REGISTRY_RPCS)
    for block in blocks:
        assert (block.call, block.expect) in CHECKS, (
            f"docs/operators.md:{block.line}: no output check for {block.call} ending "
            f"{block.expect}; add one to CHECKS"
        )


@pytest.mark.process
def test_every_grpcurl_example_of_the_guide_works(tmp_path: Path) -> None:
    blocks = guide_blocks(GUIDE.read_text())
    master = epoch_master_process(tmp_path, neurons=8, hotkey="//platform-docs/master")
    try:
        address = master.start()
        env = {
            **os.environ,
            "ADDR": address,
            "AUTH": f"authorization: Bearer {ADMIN_TOKEN}",
            "PLATFORM_ADMIN_TOKEN": ADMIN_TOKEN,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        executed: list[Block] = []
        checked: set[tuple[str, str]] = set()
        for block in blocks:
            result = subprocess.run(
                ["bash", "-c", block.code],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            executed.append(block)
            _check(block, result, master)
            checked.add((block.call, block.expect))
    finally:
        master.stop()

    called = {name for block in executed for name in _REGISTRY_CALL.findall(block.code)}
    missing = [name for name in REGISTRY_RPCS if name not in called]
    assert not missing, f"docs/operators.md runs no grpcurl example of Registry.{missing}"
    unused = [key for key in CHECKS if key not in checked]
    assert not unused, f"output checks that no example of the guide exercised: {unused}"


def _check(block: Block, result: subprocess.CompletedProcess[str], master: MasterProcess) -> None:
    where = (
        f"docs/operators.md:{block.line} ({block.call}, expected {block.expect})\n"
        f"--- block\n{block.code}--- exit status {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}\n"
        f"--- master log (tail)\n{master.log()[-3000:]}"
    )
    if block.expect == OK:
        assert result.returncode == 0, where
    else:
        assert result.returncode == GRPCURL_STATUS_BASE + GRPC_CODES[block.expect], where
        assert f"Code: {block.expect}" in result.stderr, where

    expect = CHECKS[(block.call, block.expect)]
    for text in expect.stdout:
        assert text in result.stdout, f"stdout lacks {text!r}: {where}"
    for text in expect.stdout_not:
        assert text not in result.stdout, f"stdout shows {text!r}: {where}"
    for text in expect.stderr:
        assert text in result.stderr, f"stderr lacks {text!r}: {where}"

    # Checks that depend on what the block asked for.
    if block.call == "Registry/SetChallengeStatus" and block.expect == OK:
        requested = _STATUS_REQUEST.findall(block.code)[-1]
        assert f'"status": "{requested}"' in result.stdout, where
    if block.call == "Registry/WatchRegistry":
        if "$SINCE" in block.code:
            # A resumed stream: only the missed event, no snapshot.
            assert '"type": "TYPE_PUT"' in result.stdout, where
            assert "Shortest prompt wins." in result.stdout, where
            assert '"snapshot"' not in result.stdout, where
        else:
            assert '"reason": "SNAPSHOT_REASON_INITIAL"' in result.stdout, where
