"""One-off investigation scripts, run from a checkout as `python -m benchmarks.tools.NAME`; not installed."""
