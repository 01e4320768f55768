"""One benchmark: push the runner, the sampler, the tokenizer and the .pte; W warm-up runs and N
measured runs of llama_main, each a fresh process under rss_sampler.sh; pull each run's output;
clean up. Works the same on a phone over adb and on this machine (device.py).

Per run: decode tokens/s, time to first token, prefill tokens/s (from the runner's
PyTorchObserver line), peak RSS (VmHWM from /proc/PID/status). Over the runs: median, min, max.
A failure midway keeps the runs that finished (BenchFailure.result) and still cleans the device.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from android_runner import stats
from android_runner.device import AdbDevice, Device
from android_runner.prompt import benchmark_prompt
from android_runner.runner import write_host_runner
from exporter.errors import PtekitError
from quant import registry

SCRIPTS = Path(__file__).resolve().parent / "scripts"
SAMPLER, FACTS = "rss_sampler.sh", "device_facts.sh"
RUNNER_NAME = "llama_main"
FORMAT = "ptekit-bench/1"
METRICS = ("decode_tok_s", "ttft_s", "prefill_tok_s", "peak_rss_mib", "rss_anon_mib", "rss_file_mib", "model_load_s")
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0x03: "x86"}


@dataclass
class BenchOptions:
    prompt_len: int = 64
    gen: int = 128
    runs: int = 5
    warmup: int = 1
    threads: int = -1  # llama_main's --cpu_threads; -1: its own heuristic (performance cores)
    cooldown_s: float = 0.0
    temperature: float = 0.0  # greedy, so every run generates the same tokens
    timeout_s: float = 900.0
    sample_interval_s: float = 0.1
    prompt_text: str | None = None  # default: WikiText-2 test split from the data directory (exporter.defaults.data_file)

    def check(self):
        for name, ok in (("--runs", self.runs >= 1), ("--warmup", self.warmup >= 0), ("--gen", self.gen >= 1),
                         ("--prompt-len", self.prompt_len >= 1), ("--cooldown", self.cooldown_s >= 0),
                         ("--threads", self.threads == -1 or self.threads >= 1)):
            if not ok:
                raise PtekitError(f"{name}: {getattr(self, _field(name))} is out of range")


def _field(flag: str) -> str:
    return {"--cooldown": "cooldown_s", "--prompt-len": "prompt_len"}.get(flag, flag[2:])


class BenchFailure(PtekitError):
    """A benchmark that stopped midway; .result holds the runs that finished."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def describe_model(pte: Path, tokenizer: Path | None = None) -> dict:
    from exporter.generate import tokenizer_beside
    from exporter.manifest import read_manifest

    pte = Path(pte)
    if not pte.is_file():
        raise PtekitError(f"{pte}: no such .pte file; export one with `ptekit export`")
    man = read_manifest(pte.parent)
    man = man if man and man.get("pte") == pte.name else None
    if tokenizer:
        tok_files = [Path(tokenizer)]
    elif man:
        tok_files = [pte.parent / name for name in man.get("tokenizer_files", [man["tokenizer"]])]
    else:
        tok_files = [tokenizer_beside(pte)]
    if tok_files[0].suffix == ".json" and tok_files[0].with_name("tokenizer_config.json").exists():
        cfg = tok_files[0].with_name("tokenizer_config.json")
        if cfg not in tok_files:
            tok_files.append(cfg)
    for f in tok_files:
        if not f.is_file():
            raise PtekitError(f"{f}: tokenizer file not found; pass --tokenizer")
    size = pte.stat().st_size
    method = man.get("method") if man else None
    params = man.get("model", {}).get("parameters") if man else None
    size_label = (f"{params / 1e9:.0f}B" if params >= 1e9 else f"{params / 1e6:.0f}M") if params else pte.stem
    label = f"{size_label} {registry.label(method)}" if method else pte.name
    return {
        "path": str(pte.resolve()),
        "label": label,
        "method": method,
        "parameters": params,
        "max_seq_len": man.get("model", {}).get("max_seq_len") if man else None,
        "pte_bytes": size,
        "pte_mib": round(size / 2**20, 1),
        "pte_mb": round(size / 1e6, 1),
        "tokenizer_files": [str(f) for f in tok_files],
    }


def parse_facts(text: str) -> dict:
    facts = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq:
            facts[key.strip()] = value.strip()
    return facts


def facts_summary(f: dict) -> str:
    """One line: device, SoC, cores, governor, thermal state."""
    who = " ".join(x for x in (f.get("manufacturer"), f.get("model")) if x) or f"host {f.get('hostname', '?')}"
    soc = f.get("soc") or f.get("board") or f.get("cpu_model") or "unknown SoC"
    temp = f.get("hottest_zone", "")
    thermal = "thermal " + (f.get("thermal_status") or "status n/a")
    if temp.isdigit():
        thermal += f", hottest zone {int(temp) / 1000:.1f} C"
    freqs = f.get("cpu_max_khz", "").split()
    clusters = f" (max {'/'.join(f'{int(k) / 1e6:.2f}' for k in freqs)} GHz)" if freqs else ""
    android = f", Android {f['android']}" if f.get("android") else ""
    return (f"{who}{android}, {soc}, {f.get('cores', '?')} cores{clusters}, "
            f"governor {f.get('governor') or 'n/a'}, {thermal}")


def elf_machine(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20:
        return None
    return ELF_MACHINES.get(int.from_bytes(head[18:20], "little"), f"e_machine {int.from_bytes(head[18:20], 'little')}")


def check_runner_arch(runner: Path, facts: dict, device: Device) -> None:
    arch = elf_machine(runner)
    machine = facts.get("machine", "")
    if arch and machine and arch != machine and not (arch == "arm" and machine.startswith("armv")):
        raise PtekitError(f"{runner}: an {arch} binary, but {device.name} is {machine}; build llama_main for that "
                          "device (android_runner/README.md, Android arm64 steps)")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        vals = [r[m] for r in runs if r.get(m) is not None]
        if vals:
            out[m] = {"median": round(statistics.median(vals), 4), "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def runner_flags(device: Device, model: dict, prompt: str, opts: BenchOptions) -> list[str]:
    return [
        f"--model_path={device.path(Path(model['path']).name)}",
        f"--tokenizer_path={device.path(Path(model['tokenizer_files'][0]).name)}",
        f"--prompt={prompt}",
        f"--seq_len={opts.prompt_len + opts.gen}",
        f"--cpu_threads={opts.threads}",
        f"--temperature={opts.temperature}",
        # An end token before --gen tokens would end the run early and shorten the decode window
        # silently; the count is checked after every run as well (a runner may not honour the flag).
        "--ignore_eos",
    ]


def stop_runner(device: Device, run_dir: str) -> None:
    """Best effort: kill the runner whose pid the sampler wrote."""
    if getattr(device, "lost", False):
        return
    with contextlib.suppress(Exception):
        device.shell(["sh", "-c", 'kill -9 "$(cat "$1")" 2>/dev/null; true', "sh", f"{run_dir}/pid"], timeout=30,
                     what="stopping the runner")


def one_run(device: Device, index: int, label: str, flags: list[str], opts: BenchOptions, local_tmp: Path) -> dict:
    run_dir = device.path(f"run{index}")
    argv = ["sh", device.path(SAMPLER), run_dir, str(opts.sample_interval_s), device.path(RUNNER_NAME), *flags]
    t0 = time.perf_counter()
    try:
        res = device.shell(argv, timeout=opts.timeout_s, what=label)
    except BaseException:
        stop_runner(device, run_dir)  # a timeout or Ctrl-C here must not leave it running on the phone
        raise
    wall = time.perf_counter() - t0
    if res.rc != 0 and "No space left on device" in res.stderr:
        raise PtekitError(f"{device.name}: storage full during {label} (the runner's output could not be written); "
                          "free space on the device and re-run")
    try:
        local = device.pull(run_dir, local_tmp)
    except PtekitError as e:
        raise PtekitError(f"{label} left no results ({stats.stderr_tail(res.stderr + res.stdout)}; {e})") from None
    device.shell(["rm", "-rf", run_dir], what=f"removing the output of {label}")

    def read(name: str) -> str:
        p = local / name
        return p.read_text(errors="replace") if p.exists() else ""

    rc_text = read("rc").strip()
    rc = int(rc_text) if rc_text.lstrip("-").isdigit() else res.rc
    stdout, stderr = read("stdout"), read("stderr")
    if rc != 0:
        raise PtekitError(f"the runner crashed on {label} ({stats.describe_exit(rc)}); its stderr ends: "
                          f"{stats.stderr_tail(stderr)}")
    obs = stats.parse_observer(stdout)
    metrics = stats.run_metrics(obs)
    if metrics["prompt_tokens"] != opts.prompt_len:
        raise PtekitError(f"the runner counted {metrics['prompt_tokens']} prompt tokens on {label}, not "
                          f"{opts.prompt_len}; does its tokenizer match the .pte's (--tokenizer)?")
    if metrics["generated_tokens"] != opts.gen - 1:  # the first new token comes out of prefill
        raise PtekitError(f"the runner decoded {metrics['generated_tokens']} tokens on {label}, not {opts.gen - 1} "
                          f"(--gen {opts.gen} less the one prefill makes): it stopped at an end token, so its "
                          "decode rate covers a shorter window; use a runner that honours --ignore_eos")
    temps = stats.parse_temps(read("temp"))
    return {
        "run": index,
        **metrics,
        **stats.parse_rss(read("rss")),
        **stats.host_rss_before_load(stderr),
        "temp_c_before": temps[0] if temps else None,
        "temp_c_after": temps[1] if len(temps) > 1 else None,
        "loadavg_before": float(read("load")) if read("load").strip() else None,
        "wall_s": round(wall, 2),
        "observer": obs,
    }


def bench(pte: Path, device: Device, runner: str | Path | None = None, opts: BenchOptions | None = None,
          tokenizer: Path | None = None, progress: bool = True) -> dict:
    """Benchmarks one .pte on an (unopened) device; returns the result record (see README)."""
    from exporter.progress import bar as progress_bar
    from exporter.tokenizer import Tokenizer

    opts = opts or BenchOptions()
    opts.check()
    model = describe_model(pte, tokenizer)
    if model["max_seq_len"] and opts.prompt_len + opts.gen > model["max_seq_len"]:
        raise PtekitError(f"{pte}: --prompt-len {opts.prompt_len} + --gen {opts.gen} exceeds the .pte's max_seq_len "
                          f"{model['max_seq_len']}; lower --gen or re-export with a larger --max-seq-len")
    if runner is None and isinstance(device, AdbDevice):
        raise PtekitError("--runner: give the llama_main binary built for Android arm64 (android_runner/README.md "
                          "says how), or `--runner host` for an emulated adb device that is this machine")
    prompt = benchmark_prompt(Tokenizer(model["tokenizer_files"][0]), opts.prompt_len, opts.prompt_text)
    result = {
        "format": FORMAT,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "device": {"kind": device.kind},
        "settings": {**asdict(opts), "seq_len": opts.prompt_len + opts.gen,
                     "runner": "host" if runner in (None, "host") else str(Path(runner).resolve()), "prompt": prompt},
        "runs": [],
        "warmup_runs": [],
        "summary": {},
        "complete": False,
        "error": None,
    }
    error: PtekitError | None = None
    attempted = 0
    with tempfile.TemporaryDirectory(prefix="ptekit-bench-local-") as tmp:
        tmp = Path(tmp)
        runner_path = write_host_runner(tmp / RUNNER_NAME) if runner in (None, "host") else Path(runner)
        if not runner_path.is_file():
            raise PtekitError(f"{runner_path}: runner not found; pass --runner PATH to a llama_main binary")
        try:
            device.open()
            result["device"]["name"] = device.name
            for script in (SAMPLER, FACTS):
                device.push(SCRIPTS / script)
            facts = parse_facts(device.shell(["sh", device.path(FACTS)], what="reading device facts").stdout)
            result["device"].update(facts=facts, summary=facts_summary(facts))
            check_runner_arch(runner_path, facts, device)
            device.push(runner_path, RUNNER_NAME)
            device.shell(["chmod", "755", device.path(RUNNER_NAME)], what="making the runner executable")
            for f in model["tokenizer_files"]:
                device.push(Path(f))
            device.push(Path(model["path"]))
            flags = runner_flags(device, model, prompt, opts)
            total = opts.warmup + opts.runs
            bar = progress_bar(total=total, desc=f"bench {model['label']} on {device.name}", unit="run", file=sys.stderr,
                       disable=not progress)
            for i in range(total):
                warm = i < opts.warmup
                label = f"warm-up run {i + 1} of {opts.warmup}" if warm else f"run {i - opts.warmup + 1} of {opts.runs}"
                if i and opts.cooldown_s:
                    time.sleep(opts.cooldown_s)  # let the SoC cool so runs start from the same thermal state
                attempted += 1
                rec = one_run(device, i, label, flags, opts, tmp)
                (result["warmup_runs"] if warm else result["runs"]).append(rec)
                bar.set_postfix_str(f"decode {rec['decode_tok_s']} tok/s, ttft {rec['ttft_s']} s")
                bar.update()
            bar.close()
            result["complete"] = True
        except PtekitError as e:
            error = e
        finally:
            note = device.close()  # also on Ctrl-C: nothing stays on the device
    if note:
        result["cleanup"] = note
    result["summary"] = summarize(result["runs"])
    if error is not None:
        msg = str(error)
        result["error"] = msg
        kept = len(result["runs"])
        if attempted:
            msg += f" (kept {kept} finished run{'s' if kept != 1 else ''})"
        if note:
            msg += f"; {note}"
        raise BenchFailure(msg, result)
    return result
