"""Test support: real servers and processes the suite starts and stops."""
