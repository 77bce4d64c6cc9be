"""The validator agent: streams the registry and weights, verifies and submits on chain."""
