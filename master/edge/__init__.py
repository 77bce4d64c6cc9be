"""The public edge: Envoy configured by the master over xDS, miners authenticated by ext_authz."""
