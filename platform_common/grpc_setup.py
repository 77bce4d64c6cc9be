"""gRPC core's start-up switches for the platform's own processes.

gRPC core reads ``GRPC_EXPERIMENTS`` once, when ``grpc`` is first imported, so the
``platform`` command sets it before any subcommand is loaded. The platform turns three of
gRPC's EventEngine roll-out experiments off: TCP clients, listeners and the remaining
endpoints then run on gRPC's poller, which does a call's socket work in the thread that
polls the completion queue, instead of handing each read and write to EventEngine's own
threads. Python gRPC processes (the master, the shim, the validator agent) are mostly
small unary calls, where those hand-offs cost more than the work: with the switches, the
same calls take less CPU and less time (docs/performance.md, "gRPC core's switches").

An operator's own ``GRPC_EXPERIMENTS`` always wins, and an empty value keeps gRPC's
defaults. Challenges built with the SDK run in their authors' processes and are left alone.
"""

from __future__ import annotations

import os
import sys

ENV = "GRPC_EXPERIMENTS"
EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"


def apply() -> bool:
    """Set the platform's switches in this process's environment unless it holds
    ``GRPC_EXPERIMENTS`` already; returns whether they are in force.

    Must run before ``grpc`` is imported, because gRPC has read its settings by then:
    nothing is set and the result is False (unless the environment had the switches
    already). Child processes inherit the environment, switches included.
    """
    if ENV in os.environ:
        return os.environ[ENV] == EXPERIMENTS
    if "grpc" in sys.modules:
        return False
    os.environ[ENV] = EXPERIMENTS
    return True
