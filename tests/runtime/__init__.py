"""The runtime interface, the local runtime and the orchestrator."""
