"""The control-plane store: engine, schema and migrations runner."""
