"""Running challenges: the runtime interface and its local implementation.

:mod:`.interface` is what a caller (the master's orchestrator, a validator with
``--run-challenges``) programs against; :mod:`.local` runs challenges as local
processes; :mod:`.images` reads the dev image map the local runtime needs. The
Kubernetes runtime will implement the same interface. See docs/runtime.md.
"""

from __future__ import annotations

from platform_common.runtime.interface import (
    Instance,
    InstanceState,
    Runtime,
    RuntimeBusy,
    RuntimeSpec,
)

__all__ = ["Instance", "InstanceState", "Runtime", "RuntimeBusy", "RuntimeSpec"]
