"""Suites that compose ptekit's pieces and print tables (speed, size, memory, quality, peers)."""
