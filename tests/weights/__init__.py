"""Weight math, canonical encodings, vector signatures and hotkey loading."""
