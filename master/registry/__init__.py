"""The challenge registry: rules, store, change feed and gRPC service."""
