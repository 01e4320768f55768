"""The benchmark harness's pieces that need no model: quoting through adb, device selection and its
errors, llama_main's flags, the stats line, the 64-token prompt, the model-card table.

The adb here is android_runner/fake_adb/adb: an emulated adb whose device is a directory and whose
`shell` runs the command with sh on this machine (the runs themselves are in
test_android_runner_bench.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from android_runner import report, stats
from android_runner.device import REMOTE_DIR, AdbDevice, LocalDevice, parse_devices
from android_runner.runner import FlagError, parse_flags
from conftest import FAKE_ADB
from exporter.errors import PtekitError

REPO = Path(__file__).resolve().parent.parent

# Everything a shell could mangle: quotes of both kinds, $, backticks, globs, ;, &&, newlines.
NASTY = ["it's \"quoted\"", "$HOME `id` $(id)", "*.pte ?", "a;b && c | d", "back\\slash", "two\nlines", "", "-n"]


@pytest.mark.parametrize("kind", ["adb", "local"])
def test_every_argument_reaches_the_device_shell_unchanged(fake_adb, kind):
    dev = AdbDevice() if kind == "adb" else LocalDevice()
    dev.open()
    try:
        r = dev.shell(["printf", "[%s]\\n", *NASTY])
        assert r.rc == 0, r.stderr
        assert r.stdout == "".join(f"[{a}]\n" for a in NASTY)
        # The command's own exit status comes back; a failing command is not a transport error.
        assert dev.shell(["sh", "-c", "exit 3"]).rc == 3
    finally:
        dev.close()


def test_adb_workdir_is_created_clean_and_removed(fake_adb, tmp_path):
    stale = fake_adb / REMOTE_DIR.lstrip("/") / "left-over.pte"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an interrupted run")
    dev = AdbDevice()
    dev.open()
    assert dev.serial == "emulator-5554"
    assert not stale.exists()
    f = tmp_path / "x.bin"
    f.write_bytes(b"0123456789")
    remote = dev.push(f)
    assert (fake_adb / remote.lstrip("/")).read_bytes() == b"0123456789"
    back = tmp_path / "back"
    back.mkdir()
    assert (dev.pull(remote, back)).read_bytes() == b"0123456789"
    assert dev.close() is None
    assert not (fake_adb / REMOTE_DIR.lstrip("/")).exists()
    calls = [json.loads(line) for line in (tmp_path / "adb.log").read_text().splitlines()]
    assert all(c[:2] == ["-s", "emulator-5554"] for c in calls if c != ["devices", "-l"])


def _open_error(**kw) -> str:
    with pytest.raises(PtekitError) as e:
        AdbDevice(**kw).open()
    return str(e.value)


def test_device_selection_errors(fake_adb, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "")
    assert "no Android device attached" in _open_error()
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M:device,emulator-5554:device")
    msg = _open_error()
    assert "several devices attached (R58M (Fake_adb_device), emulator-5554 (Fake_adb_device))" in msg and "--device SERIAL" in msg
    assert "device nope not found" in _open_error(serial="nope")
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M:unauthorized")
    assert "unauthorized" in _open_error() and "Allow USB debugging" in _open_error()
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M:offline,emulator-5554:device")
    assert "offline" in _open_error(serial="R58M")
    # The healthy one of several, by serial.
    dev = AdbDevice(serial="emulator-5554")
    dev.open()
    assert dev.close() is None


def test_no_adb(monkeypatch, tmp_path):
    monkeypatch.delenv("ADB", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PtekitError, match="adb not found.*--device local"):
        AdbDevice()
    monkeypatch.setenv("ADB", str(tmp_path / "missing-adb"))
    with pytest.raises(PtekitError, match="missing-adb: not an executable"):
        AdbDevice()


def test_cli_reports_a_device_problem_in_one_line(fake_adb, monkeypatch, smollm2_hf, tmp_path):
    # The device is checked before the .pte is read, so any file stands in for it here.
    (tmp_path / "model.pte").write_bytes(b"not read")
    (tmp_path / "tokenizer.json").write_bytes((smollm2_hf / "tokenizer.json").read_bytes())
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M:unauthorized")
    p = subprocess.run([sys.executable, "-m", "exporter.cli", "bench", str(tmp_path / "model.pte"), "--runner", "host"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "R58M is unauthorized" in err[0], p.stderr
    assert "Traceback" not in p.stderr


NO_PERMISSIONS = ("no permissions (user in plugdev group; are your udev rules wrong?); "
                  "see [http://developer.android.com/tools/device.html]")


def test_parse_devices():
    text = (f"* daemon started successfully\nList of devices attached\nR58M\tdevice\nemu-1\toffline\n"
            f"0123ABC\t{NO_PERMISSIONS}\n\n")
    assert parse_devices(text) == {"R58M": {"state": "device"}, "emu-1": {"state": "offline"},
                                   "0123ABC": {"state": NO_PERMISSIONS}}
    long = ("List of devices attached\n"
            "R58M                   device usb:1-1 product:p3sxeea model:SM_G998B device:p3s transport_id:3\n"
            f"0123ABC                {NO_PERMISSIONS} usb:1-2 transport_id:4\n"
            "emulator-5554          sideload product:sdk model:sdk_phone device:emu64 transport_id:5\n\n")
    assert parse_devices(long) == {
        "R58M": {"state": "device", "usb": "1-1", "product": "p3sxeea", "model": "SM_G998B", "device": "p3s",
                 "transport_id": "3"},
        "0123ABC": {"state": NO_PERMISSIONS, "usb": "1-2", "transport_id": "4"},
        "emulator-5554": {"state": "sideload", "product": "sdk", "model": "sdk_phone", "device": "emu64",
                          "transport_id": "5"},
    }


# Each state adb reports, through the emulated adb's `adb devices -l`, and what the one line must say.
STATE_MESSAGES = {
    "unauthorized": "R58M is unauthorized: unlock the phone and accept the 'Allow USB debugging?' prompt",
    "authorizing": "R58M is still authorizing this computer's key",
    "offline": "R58M is offline: unplug and replug it (or run `adb reconnect`)",
    "connecting": "R58M is still connecting: wait a few seconds and re-run",
    "no permissions": "R58M has no permissions: this user may not open its USB device (adb: user in plugdev group; "
                      "are your udev rules wrong?); add a udev rule",
    "recovery": "R58M is in recovery mode: reboot it into Android (`adb -s R58M reboot`)",
    "rescue": "R58M is in rescue mode: reboot it into Android",
    "sideload": "R58M is in sideload mode (waiting for an update package): finish or cancel the sideload",
    "bootloader": "R58M is in the bootloader: reboot it into Android (`fastboot reboot`)",
    "host": "R58M is an adb host, not a phone (state 'host'): choose a phone's serial with --device",
    "detached": "R58M is detached from adb: run `adb -s R58M attach`",
    "weird": "R58M is in state 'weird', not 'device'",
}


@pytest.mark.parametrize("state", list(STATE_MESSAGES))
def test_every_device_state_gets_its_own_remedy(fake_adb, monkeypatch, state):
    monkeypatch.setenv("FAKE_ADB_DEVICES", f"R58M:{state}")
    msg = _open_error()
    assert STATE_MESSAGES[state] in msg and "\n" not in msg, msg
    # Named explicitly among several, the same line.
    monkeypatch.setenv("FAKE_ADB_DEVICES", f"emulator-5554:device,R58M:{state}")
    assert STATE_MESSAGES[state] in _open_error(serial="R58M")
    assert not (fake_adb.parent / "R58M").exists()  # nothing was sent to it


def test_runner_flags_follow_gflags():
    f = parse_flags(["--model_path=m.pte", "--tokenizer_path", "t.json", "-seq_len", "192", "--warmup",
                     "--prompt=a b --c", "--temperature=0"])
    assert (f["model_path"], f["tokenizer_path"], f["seq_len"], f["warmup"], f["prompt"], f["temperature"]) == \
        ("m.pte", "t.json", 192, True, "a b --c", 0.0)
    assert parse_flags(["--warmup=false"])["warmup"] is False
    assert parse_flags(["--nowarmup"])["warmup"] is False
    assert parse_flags([])["seq_len"] == 128 and parse_flags([])["cpu_threads"] == -1
    for bad in (["--max_tokens=3"], ["--seq_len=x"], ["--seq_len"], ["stray"], ["--warmup=maybe"]):
        with pytest.raises(FlagError):
            parse_flags(bad)


def test_observer_line_parsing_and_metrics():
    obs = {"prompt_tokens": 64, "generated_tokens": 127, "model_load_start_ms": 1000, "model_load_end_ms": 1900,
           "inference_start_ms": 2000, "prompt_eval_end_ms": 2250, "first_token_ms": 2250,
           "inference_end_ms": 4790, "SCALING_FACTOR_UNITS_PER_SECOND": 1000}
    # The generated text is printed right before the stats line, possibly on the same line.
    out = "prompt text and generated words" + stats.OBSERVER + json.dumps(obs) + "\nafter\n"
    m = stats.run_metrics(stats.parse_observer(out))
    assert m["prefill_tok_s"] == pytest.approx(64 / 0.25)
    assert m["decode_tok_s"] == pytest.approx(127 / 2.54, abs=0.01)
    assert m["ttft_s"] == pytest.approx(0.25) and m["model_load_s"] == pytest.approx(0.9)
    with pytest.raises(PtekitError, match="no 'PyTorchObserver"):
        stats.parse_observer("Segmentation fault\n")
    with pytest.raises(PtekitError, match="lacks"):
        stats.parse_observer(stats.OBSERVER + '{"prompt_tokens": 3}')


def test_rss_samples_and_exit_descriptions():
    r = stats.parse_rss("1024 1000\n204800 102400\n\n307200 2048\n")
    assert r == {"samples": 3, "peak_rss_mib": 300.0, "max_sampled_vmrss_mib": 100.0, "rss_anon_mib": None,
                 "rss_file_mib": None}
    # With the anonymous/file columns, the split is the one of the largest VmRSS sample.
    r = stats.parse_rss("2048 2048 1024 1024\n4096 3072 1024 2048\n4096 1024 512 512\n")
    assert (r["max_sampled_vmrss_mib"], r["rss_anon_mib"], r["rss_file_mib"]) == (3.0, 1.0, 2.0)
    assert stats.parse_rss("")["peak_rss_mib"] is None
    assert stats.describe_exit(139) == "killed by SIGSEGV, exit 139"
    assert stats.describe_exit(1) == "exit 1"
    assert stats.stderr_tail("a\n\nb\nc\nd\n") == "b | c | d"


def test_sampler_measures_a_process_it_runs(tmp_path):
    """rss_sampler.sh on a process that holds ~64 MiB of its own and touches a 32 MiB mapped file:
    VmHWM sees both, the split puts each where it is, the exit status comes back."""
    script = REPO / "android_runner" / "scripts" / "rss_sampler.sh"
    mapped = tmp_path / "mapped.bin"
    mapped.write_bytes(b"\1" * (32 << 20))
    hold = ("import mmap, time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); "
            f"f = open({str(mapped)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
            "s = sum(m[i] for i in range(0, len(m), 4096)); time.sleep(0.6); raise SystemExit(3)")
    p = subprocess.run(["sh", str(script), str(tmp_path / "run"), "0.05", sys.executable, "-c", hold])
    assert p.returncode == 3
    assert (tmp_path / "run" / "rc").read_text().strip() == "3"
    r = stats.parse_rss((tmp_path / "run" / "rss").read_text())
    assert r["samples"] >= 3
    assert 64 + 32 < r["peak_rss_mib"] < 64 + 32 + 200
    assert 64 < r["rss_anon_mib"] < 64 + 100 and 32 < r["rss_file_mib"] < 32 + 100, r


def test_benchmark_prompt_has_exactly_n_tokens(smollm2_hf, wikitext_test):
    from android_runner.prompt import benchmark_prompt
    from exporter.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_hf / "tokenizer.json")
    text = wikitext_test.read_text(encoding="utf-8")
    for n in (1, 16, 64, 300):
        p = benchmark_prompt(tok, n, wikitext_test)
        assert len(tok.encode(p)) == n
        assert p in text
    with pytest.raises(PtekitError, match="no paragraph"):
        benchmark_prompt(tok, 100_000, wikitext_test)


def _result(method, label, size_mib, decode, ttft, prefill, rss, complete=True):
    return {"model": {"label": label, "method": method, "pte_mib": size_mib}, "complete": complete,
            "settings": {"runs": 3}, "runs": [{}] * 3,
            "summary": {"decode_tok_s": {"median": decode}, "ttft_s": {"median": ttft},
                        "prefill_tok_s": {"median": prefill}, "peak_rss_mib": {"median": rss}}}


def test_model_card_table_relative_to_bf16():
    rows = report.markdown_table([_result("bf16", "1B BF16", 2358, 19.2, 1.0, 60.3, 3185),
                                  _result("spinquant", "1B SpinQuant", 1083, 50.2, 0.231, 260.5, 1921)]).splitlines()
    assert rows[0].startswith("| Model | Decode (tokens/sec) | Time-to-first-token (sec) | Prefill (tokens/sec)")
    assert rows[2] == "| 1B BF16 (baseline) | 19.2 | 1.000 | 60.3 | 2,358.0 | 3,185 |"
    # The model card's own second row: 2.6x decode, -76.9% TTFT, 4.3x prefill, -54.1% size, -39.7% RSS.
    assert rows[3] == ("| 1B SpinQuant | 50.2 (2.6x) | 0.231 (-76.9%) | 260.5 (4.3x) | 1,083.0 (-54.1%) | "
                       "1,921 (-39.7%) |")
    alone = report.markdown_table([_result("ptq", "135M PTQ", 112, 56.0, 0.14, 447.6, 546, complete=False)])
    assert "135M PTQ (incomplete: 3 of 3 runs)" in alone and "x)" not in alone and "%)" not in alone


# --- the emulated adb behaves like a real one where the harness depends on it ----------------------


def adb(*args, **kw):
    return subprocess.run([str(FAKE_ADB), *args], capture_output=True, text=True, **kw)


def test_old_device_status_comes_from_the_exit_marker(fake_adb, monkeypatch):
    """Before Android 7, `adb shell` exits 0 whatever the command did; the harness reads the status the
    command line prints itself."""
    monkeypatch.setenv("FAKE_ADB_OLD_SHELL", "1")
    assert adb("shell", "exit 3").returncode == 0  # what such a device's adb answers
    assert "shell_v2" not in adb("features").stdout
    dev = AdbDevice()
    dev.open()
    try:
        assert dev.shell(["sh", "-c", "exit 3"]).rc == 3
        r = dev.shell(["printf", "[%s]", *NASTY])  # no newline at the end: the marker must not eat output
        assert (r.rc, r.stdout) == (0, "".join(f"[{a}]" for a in NASTY))
        assert dev.shell(["false"]).rc == 1
    finally:
        assert dev.close() is None
    assert not (fake_adb / REMOTE_DIR.lstrip("/")).exists()


def test_failed_push_leaves_no_partial_file(fake_adb, monkeypatch, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * 3_000_000)
    monkeypatch.setenv("FAKE_ADB_STORAGE_MB", "1")
    dev = AdbDevice()
    dev.open()
    with pytest.raises(PtekitError, match="storage full during pushing big.bin"):
        dev.push(big)
    assert not (fake_adb / REMOTE_DIR.lstrip("/") / "big.bin").exists()  # before any cleanup of ours
    assert dev.close() is None


def _wait_for(path: Path, seconds: float = 10.0) -> bool:
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["SIGKILL", "timeout"])
def test_killed_client_hangs_up_the_remote_command(fake_adb, how):
    import signal

    dev = AdbDevice()
    dev.open()
    # The command says when its trap is in (`ready`): a hang-up before that would end it without one,
    # which is not what this test is about, and on a loaded machine the shell can start late.
    argv = ["sh", "-c", 'trap "echo hup > $1; exit 129" HUP; touch "$2"; sleep 60 & wait', "sh",
            dev.path("hup"), dev.path("ready")]
    remote = fake_adb / REMOTE_DIR.lstrip("/")
    marker = remote / "hup"
    if how == "SIGKILL":
        p = subprocess.Popen([str(FAKE_ADB), "shell", " ".join(__import__("shlex").quote(a) for a in argv)])
        try:
            assert _wait_for(remote / "ready", 30), "the remote command did not start"
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait()
    else:
        with pytest.raises(PtekitError, match="did not finish within 3 s"):
            dev.shell(argv, timeout=3, what="the trap")
        assert (remote / "ready").exists(), "the remote command had not started within the timeout"
    assert _wait_for(marker), "the remote command got no SIGHUP"
    assert marker.read_text() == "hup\n"
    assert dev.close() is None


def test_transport_id_selects_a_device(fake_adb, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M:device,emulator-5554:device")
    assert adb("-t", "2", "shell", "getprop", "ro.product.model").stdout == "fake adb device emulator-5554\n"
    assert adb("-t", "1", "shell", "getprop", "ro.product.model").stdout == "fake adb device R58M\n"
    r = adb("-t", "9", "shell", "true")
    assert r.returncode == 1 and "transport id '9' not found" in r.stderr
    long = parse_devices(adb("devices", "-l").stdout)
    assert long["R58M"]["transport_id"] == "1" and long["emulator-5554"]["model"] == "Fake_adb_device"


def test_device_paths_are_mapped_but_not_text_inside_an_argument(fake_adb):
    dev = AdbDevice()
    dev.open()
    try:
        words = ["--prompt=files in /data/local stay", "see /data/ here", "'/data/x'"]
        r = dev.shell(["printf", "%s\\n", *words])
        assert r.stdout.splitlines() == words
        # A path argument, alone or as a flag's value, is the device's.
        (fake_adb / REMOTE_DIR.lstrip("/") / "f").write_text("on the device")
        assert dev.shell(["cat", dev.path("f")]).stdout == "on the device"
        assert dev.shell(["sh", "-c", 'cat "${1#--in=}"', "sh", f"--in={dev.path('f')}"]).stdout == "on the device"
    finally:
        assert dev.close() is None


@pytest.mark.parametrize("state, message", [("no permissions", "insufficient permissions for device"),
                                            ("connecting", "device still connecting"),
                                            ("authorizing", "device still authorizing"),
                                            ("sideload", "error: closed")])
def test_commands_to_a_device_in_another_state_fail_as_adb_does(fake_adb, monkeypatch, state, message):
    monkeypatch.setenv("FAKE_ADB_DEVICES", f"R58M:{state}")
    r = adb("-s", "R58M", "shell", "true")
    assert r.returncode == 1 and message in r.stderr


def test_bench_results_are_written_together_or_not_at_all(tmp_path):
    """The JSON and the table: when the second cannot be written, the first is not replaced either."""
    r = _result("bf16", "1B BF16", 2358, 19.2, 1.0, 60.3, 3185)
    for v in r["summary"].values():
        v.update(min=v["median"], max=v["median"], n=3)
    results = [{**r, "runs": []}]  # the table and the spread, without the notes on the runs' settings
    old = tmp_path / "bench.json"
    old.write_text("previous results")
    with pytest.raises(PtekitError, match="missing/bench.md: cannot write it"):
        report.write(results, old, tmp_path / "missing" / "bench.md")
    assert old.read_text() == "previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no temp file either
    report.write(results, old, tmp_path / "bench.md")
    assert json.loads(old.read_text())["results"][0]["model"]["label"] == "1B BF16"
    assert (tmp_path / "bench.md").read_text() == report.markdown(results)
