"""Unit tests: the pure cores driven with plain data and a fake clock (no sockets, no processes)."""
