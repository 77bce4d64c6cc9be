"""The weights pipeline (epochs, signed vectors, the Weights service)."""
