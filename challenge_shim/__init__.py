"""The challenge shim sidecar and the SDK a Python challenge uses to speak the contract."""
