"""The master: challenge registry, epochs and weights, runtimes, broker, edge control plane."""
