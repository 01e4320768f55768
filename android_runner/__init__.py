"""Benchmarks .pte files with ExecuTorch's llama runner on an Android phone over adb, or on this
machine, and reports the numbers of Meta's Llama 3.2 model card (decode and prefill tokens/s,
time to first token at a 64-token prompt, .pte size, peak RSS).

device.py: AdbDevice / LocalDevice (push, shell, pull, clean up); runner.py: llama_main's flags
and stats line on this machine; bench.py: the runs; stats.py: reading their output; report.py:
JSON and the markdown table; scripts/: what runs on the device; fake_adb/: an emulated adb for
tests.
"""
