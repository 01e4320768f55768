"""The benchmark end to end with a real .pte on the real ExecuTorch runtime, on this machine and
through the emulated adb (android_runner/fake_adb/adb: its device is a directory here, its `shell`
really runs the commands), with faults injected through the emulated adb: push failure, storage
full, runner crash, the device dropping off midway (and coming back, or not)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from android_runner.bench import BenchFailure, BenchOptions, bench, check_runner_arch, elf_machine
from android_runner.device import REMOTE_DIR, AdbDevice, LocalDevice
from exporter.errors import PtekitError

REPO = Path(__file__).resolve().parent.parent
GEN = 8  # new tokens per run: enough for a decode rate, short enough for the default suite


def left_on_device(root: Path) -> list[str]:
    d = root / REMOTE_DIR.lstrip("/")
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def opts(**kw) -> BenchOptions:
    return BenchOptions(**{"prompt_len": 64, "gen": GEN, "runs": 2, "warmup": 0, **kw})


def check_run(r: dict):
    assert r["prompt_tokens"] == 64  # counted by the runner's own tokenizer on the device
    assert r["generated_tokens"] == GEN - 1  # the first new token comes out of prefill
    obs = r["observer"]
    # ExecuTorch's runner reports its own rates; ours, from the same timestamps, must agree.
    if r["prefill_tok_s"] is not None:
        assert r["prefill_tok_s"] == pytest.approx(obs["prefill_token_per_sec"], rel=1e-3)
    assert r["decode_tok_s"] == pytest.approx(obs["decode_token_per_sec"], rel=1e-3)
    assert 0 < r["ttft_s"] < 60
    assert r["samples"] >= 1
    # The host runner's peak holds Python + libtorch, then the model on top of it.
    assert r["peak_rss_mib"] > r["rss_before_model_load_mib"] > 100


def test_bench_through_emulated_adb(fake_adb, tiny_ptq_pte, tmp_path):
    res = bench(tiny_ptq_pte, AdbDevice(), "host", opts(runs=2, warmup=1), progress=False)
    assert res["complete"] and res["error"] is None
    assert len(res["runs"]) == 2 and len(res["warmup_runs"]) == 1
    for r in res["runs"]:
        check_run(r)
    assert res["summary"]["decode_tok_s"]["min"] <= res["summary"]["decode_tok_s"]["median"] \
        <= res["summary"]["decode_tok_s"]["max"]
    assert res["model"]["pte_bytes"] == tiny_ptq_pte.stat().st_size and res["model"]["method"] == "ptq"
    assert res["device"]["facts"]["model"] == "fake adb device emulator-5554"  # from the device's getprop
    assert left_on_device(fake_adb) == []
    # The prompt travelled as one shell-quoted argument.
    calls = [json.loads(line) for line in (tmp_path / "adb.log").read_text().splitlines()]
    runs = [c for c in calls if c[2:3] == ["shell"] and "--model_path" in c[3]]
    assert len(runs) == 3
    argv = shlex.split(runs[0][3])
    assert [a for a in argv if a.startswith("--prompt")] == ["--prompt=" + res["settings"]["prompt"]]


def test_bench_on_this_machine(tiny_ptq_pte):
    dev = LocalDevice()
    res = bench(tiny_ptq_pte, dev, None, opts(runs=1), progress=False)
    assert res["complete"] and len(res["runs"]) == 1
    check_run(res["runs"][0])
    assert res["device"]["facts"]["cores"] == str(os.cpu_count())
    assert not Path(dev.workdir).exists()


def test_push_failure_leaves_nothing(fake_adb, tiny_ptq_pte, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_PUSH_FAIL", "model.pte")
    with pytest.raises(BenchFailure) as e:
        bench(tiny_ptq_pte, AdbDevice(), "host", opts(), progress=False)
    assert "pushing model.pte" in str(e.value) and "Permission denied" in str(e.value)
    assert e.value.result["runs"] == [] and not e.value.result["complete"]
    assert left_on_device(fake_adb) == []


def test_storage_full(fake_adb, tiny_ptq_pte, monkeypatch):
    small = sum(f.stat().st_size for f in tiny_ptq_pte.parent.glob("tokenizer*")) + 200_000
    monkeypatch.setenv("FAKE_ADB_STORAGE_MB", str((small + tiny_ptq_pte.stat().st_size // 2) / 1e6))
    with pytest.raises(BenchFailure) as e:
        bench(tiny_ptq_pte, AdbDevice(), "host", opts(), progress=False)
    assert "storage full during pushing model.pte" in str(e.value) and "free space" in str(e.value)
    assert left_on_device(fake_adb) == []  # the half-written .pte too


def test_runner_crash_midway_keeps_finished_runs(fake_adb, tiny_ptq_pte, tmp_path, monkeypatch):
    """Through the CLI: one error line, exit 2, the finished run in the JSON, nothing on the device."""
    monkeypatch.setenv("FAKE_ADB_CRASH_RUN", "2")
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "exporter.cli", "bench", str(tiny_ptq_pte), "--runner", "host",
                        "--runs", "3", "--warmup", "0", "--gen", str(GEN), "--json", str(out), "-q"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr
    for part in ("crashed on run 2 of 3", "killed by SIGSEGV, exit 139", "its stderr ends:", "kept 1 finished run",
                 str(out)):
        assert part in err[0]
    res = json.loads(out.read_text())["results"][0]
    assert not res["complete"] and "crashed" in res["error"] and len(res["runs"]) == 1
    check_run(res["runs"][0])
    assert "(incomplete: 1 of 3 runs)" in p.stdout
    assert left_on_device(fake_adb) == []


def test_device_vanishing_midway_and_coming_back(fake_adb, tiny_ptq_pte, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_VANISH_ON_RUN", "2")
    monkeypatch.setenv("FAKE_ADB_RETURN_AFTER", "3")
    with pytest.raises(BenchFailure) as e:
        bench(tiny_ptq_pte, AdbDevice(reconnect_wait_s=60), "host", opts(runs=3), progress=False)
    assert "device emulator-5554 disconnected during run 2 of 3" in str(e.value)
    assert "kept 1 finished run" in str(e.value)
    assert len(e.value.result["runs"]) == 1
    assert left_on_device(fake_adb) == []  # cleaned once it was back


def test_device_gone_for_good(fake_adb, tiny_ptq_pte, monkeypatch):
    # The device's 10th command is the push of the .pte (rm, mkdir, 2 scripts, facts, runner, chmod,
    # 2 tokenizer files, .pte); it drops off halfway through it and stays away.
    monkeypatch.setenv("FAKE_ADB_VANISH_AFTER", "10")
    with pytest.raises(BenchFailure) as e:
        bench(tiny_ptq_pte, AdbDevice(reconnect_wait_s=1), "host", opts(), progress=False)
    msg = str(e.value)
    assert "disconnected during pushing model.pte" in msg and "may remain" in msg and "next `ptekit bench` removes" in msg
    left = left_on_device(fake_adb)
    assert left and "model.pte" not in left  # adbd removed the half-pushed .pte; the earlier files stay
    # Plugged back in: the next bench's first step removes what was left.
    monkeypatch.delenv("FAKE_ADB_VANISH_AFTER")
    (fake_adb.parent / ".fake_adb_state.json").unlink()
    dev = AdbDevice()
    dev.open()
    assert left_on_device(fake_adb) == []
    assert dev.close() is None


def test_timeout_stops_the_runner_on_the_device(fake_adb, tiny_ptq_pte):
    with pytest.raises(BenchFailure, match="run 1 of 2 did not finish within 2 s on emulator-5554; raise --timeout"):
        bench(tiny_ptq_pte, AdbDevice(), "host", opts(timeout_s=2), progress=False)
    assert left_on_device(fake_adb) == []
    still_running = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(fake_adb).encode() in cmdline:
            still_running.append(cmdline)
    assert still_running == []


def test_runner_for_another_architecture_is_refused(tmp_path):
    binary = Path(sys.executable).resolve()
    host = elf_machine(binary)  # whatever this machine is
    other = "x86_64" if host == "aarch64" else "aarch64"
    with pytest.raises(PtekitError, match=f"an {host} binary, but local is {other}"):
        check_runner_arch(binary, {"machine": other}, LocalDevice())
    check_runner_arch(binary, {"machine": host}, LocalDevice())
    # Each ELF machine field the check knows, read from a header built here.
    for code, name in ((0x3E, "x86_64"), (0xB7, "aarch64"), (0x28, "arm")):
        elf = tmp_path / name
        elf.write_bytes(b"\x7fELF" + b"\0" * 14 + code.to_bytes(2, "little") + b"\0" * 44)
        assert elf_machine(elf) == name


@pytest.mark.slow
def test_smollm2_through_emulated_adb(fake_adb, smollm2_ptq_pte):
    res = bench(smollm2_ptq_pte, AdbDevice(), "host", opts(runs=1, gen=32), progress=False)
    r = res["runs"][0]
    assert r["prompt_tokens"] == 64 and r["generated_tokens"] == 31 and r["decode_tok_s"] > 1
    assert res["model"]["label"] == "135M PTQ"
    assert r["peak_rss_mib"] > r["rss_before_model_load_mib"] + res["model"]["pte_mib"] / 2
    assert left_on_device(fake_adb) == []


def test_old_device_runner_crash_is_detected(fake_adb, tiny_ptq_pte, monkeypatch):
    """A device before Android 7 answers every `adb shell` with status 0; the crash is still seen."""
    monkeypatch.setenv("FAKE_ADB_OLD_SHELL", "1")
    monkeypatch.setenv("FAKE_ADB_CRASH_RUN", "2")
    with pytest.raises(BenchFailure) as e:
        bench(tiny_ptq_pte, AdbDevice(), "host", opts(runs=2), progress=False)
    assert "crashed on run 2 of 2" in str(e.value) and "killed by SIGSEGV" in str(e.value)
    assert len(e.value.result["runs"]) == 1
    check_run(e.value.result["runs"][0])
    assert left_on_device(fake_adb) == []
