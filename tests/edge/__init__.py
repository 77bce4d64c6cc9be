"""Edge tests: the translator and the edge in a real Envoy."""
