"""The phone path's flags: llama_main gets --ignore_eos and a decode window that ended early is an error;
a phone gets llama_main's own thread count, never this machine's core count."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from android_runner import stats
from android_runner.bench import BenchFailure, BenchOptions, bench
from android_runner.device import AdbDevice
from android_runner.runner import parse_flags
from benchmarks.suite import SuiteOptions, bench_options

REPO = Path(__file__).resolve().parent.parent
GEN = 8


def test_phone_gets_llama_mains_own_thread_count():
    assert bench_options(SuiteOptions(device="emulator-5554")).threads == -1
    assert bench_options(SuiteOptions(device="local")).threads == (os.cpu_count() or 1)
    assert bench_options(SuiteOptions(device="emulator-5554", threads=4)).threads == 4


def test_host_runner_takes_llama_mains_flags():
    flags = parse_flags(["--model_path=m.pte", "--data_paths=w.ptd", "--ignore_eos", "--cpu_threads=-1"])
    assert flags["data_paths"] == "w.ptd" and flags["ignore_eos"] is True


def test_early_end_token_is_an_error(tmp_path, monkeypatch, tiny_ptq_pte):
    """A runner that stops 3 tokens short (an end token it did not ignore): one line, the run not kept
    as if it had decoded the whole window. Through the emulated adb, with a stand-in runner script."""
    monkeypatch.setenv("ADB", str(REPO / "android_runner" / "fake_adb" / "adb"))
    monkeypatch.setenv("FAKE_ADB_ROOT", str(tmp_path / "devices"))
    for var in [v for v in os.environ if v.startswith("FAKE_ADB_") and v != "FAKE_ADB_ROOT"]:
        monkeypatch.delenv(var)
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    obs = {"prompt_tokens": 64, "generated_tokens": GEN - 4, "model_load_start_ms": 1000, "model_load_end_ms": 1900,
           "inference_start_ms": 2000, "prompt_eval_end_ms": 2250, "first_token_ms": 2250,
           "inference_end_ms": 2790, "SCALING_FACTOR_UNITS_PER_SECOND": 1000}
    runner = tmp_path / "llama_main"
    runner.write_text("#!/bin/sh\n"
                      'case " $* " in *" --ignore_eos "*) ;; *) echo "no --ignore_eos" >&2; exit 3;; esac\n'
                      f"echo {shlex.quote(stats.OBSERVER + json.dumps(obs))}\n")
    runner.chmod(0o755)
    with pytest.raises(BenchFailure, match=rf"decoded {GEN - 4} tokens .* not {GEN - 1}.*--ignore_eos"):
        bench(tiny_ptq_pte, AdbDevice(), runner, BenchOptions(prompt_len=64, gen=GEN, runs=1, warmup=0),
              progress=False)
