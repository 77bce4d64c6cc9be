"""Code shared by the master, the validator agent and the challenge shim."""
