"""Platform test suite."""
