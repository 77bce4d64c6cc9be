"""Benchmarks of the Platform master; run each as a module from the repository root,
e.g. ``python -m bench.registry_fanout`` (see docs/performance.md).

A benchmark that hosts the platform's components in its own process (the master of
``bench.epoch``, for one) starts gRPC as the ``platform`` command does, with
``platform_common.grpc_setup``'s switches; challenge stand-ins run with gRPC's defaults,
as challenges do."""

from platform_common import grpc_setup

grpc_setup.apply()
