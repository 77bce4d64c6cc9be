"""Generated from proto/platform_network by `make gen`. Do not edit."""
