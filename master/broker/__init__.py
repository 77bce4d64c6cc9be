"""The Broker: sandboxed jobs run on behalf of challenges."""
