"""The benchmark suite: one checkpoint, every method, measured the same way, beside its peers.

For each method: `ptekit export` (a child process, timed), the android_runner harness on the .pte
(decode, time to first token at a 64-token prompt, prefill, size, peak RSS), and `ptekit eval` on
the .pte itself (perplexity, KL and top-1 agreement against the BF16 checkpoint). Then the peers on
the same machine in the same run: ExecuTorch's export_llama on the same checkpoint (export time,
size, and its .pte through the same harness) and llama.cpp (llama-cpp-python) on a GGUF of the same
model. A roofline puts every decode speed against this machine's measured memory bandwidth.

Every step writes its JSON under the output directory before the next starts, and a re-run skips
a step whose JSON is there and was made the same way (the same command, settings and .pte), so an
interrupted suite resumes and `--methods` can grow a finished run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from exporter import log
from exporter.atomic import ensure_writable_dir, write_text
from exporter.defaults import EVAL_SEQ_LEN
from exporter.errors import PtekitError
from quant import registry

_log = log.get(__name__)
REPO = Path(__file__).resolve().parent.parent
FORMAT = "ptekit-benchmarks/1"
ALL_PEERS = ("export_llama", "llamacpp")
# Llama 3.2's exact shapes with random weights: name -> the params.json preset they are built from.
RANDOM_MODELS = {"llama3.2-1b-random": "llama3.2-1b", "llama3.2-3b-random": "llama3.2-3b"}
MODELS = {"smollm2": "smollm2-135m", "smollm2-135m": "smollm2-135m", **{m: m for m in RANDOM_MODELS}}
# A random model is there for its .pte sizes and the runner's memory, which do not depend on how
# long a method optimized (random weights have nothing to learn and no quality to score). So each
# method's optimization runs one step on short windows: every stage still runs at 1B scale, in
# minutes instead of hours. qlora skips its QAT round (qat_steps=0): full-parameter AdamW at 1B keeps
# three more fp32 copies of the weights, more than a 24 GB machine holds beside the model.
SIZE_RUN_OPTIONS = {
    "spinquant": ("iterations=1", "train_batch=1", "train_seq_len=256", "init_probe=0", "init_eval_batches=1",
                  "gptq_samples=8", "gptq_seq_len=256"),  # the model writes 8 windows of 257 tokens to learn on
    # gen_sequences=1: the one training window the LoRA step reads; with the default 256 a 1B run on 2 CPU
    # cores was still writing its training text after 8 minutes. rotation=hadamard: the default start learns
    # its rotations with spinquant's full cpu preset (100 steps), which none of these options shorten; a
    # Hadamard start leaves the same file (R1/R2 merged into the weights, R4 online, GPTQ's integers).
    "qlora": ("qat_steps=0", "lora_steps=1", "micro_batch=1", "grad_accum=1", "seq_len=256", "gen_sequences=1",
              "rotation=hadamard"),
}


@dataclass
class SuiteOptions:
    model: str = "smollm2"  # smollm2 | llama3.2-1b-random | llama3.2-3b-random | a checkpoint path
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(registry.METHODS))  # every registered method
    peers: tuple[str, ...] = ALL_PEERS
    device: str = "local"  # 'local' or an adb serial
    runner: str | None = None  # llama_main for a phone; None: the host runner
    out: Path = Path("out/benchmarks")
    max_seq_len: int = 2048
    prompt_len: int = 64
    gen: int = 128
    runs: int = 3
    warmup: int = 1
    threads: int = 0  # 0: every core of the machine that runs the model (_threads)
    eval_seq_len: int = EVAL_SEQ_LEN  # `ptekit eval`'s default window
    eval_max_tokens: int = 16384  # 0: no quality evaluation (the random 1B model's default)
    steps: int | None = None  # spinquant/qlora optimization steps (None: the method's default)
    gguf: Path | None = None  # the llama.cpp peer's GGUF (default for smollm2: the embedded one)
    progress: bool = True
    echo: object = field(default=lambda s: _log.info(s), repr=False)

    def check(self):
        for m in self.methods:
            if m not in registry.METHODS:
                raise PtekitError(f"--methods {m}: not a method here (known: {', '.join(registry.METHODS)})")
        for p in self.peers:
            if p not in ALL_PEERS:
                raise PtekitError(f"--peers {p}: unknown peer; choose from {', '.join(ALL_PEERS)}")
        if self.prompt_len + self.gen > self.max_seq_len:
            raise PtekitError(f"--prompt-len {self.prompt_len} + --gen {self.gen} exceeds --max-seq-len {self.max_seq_len}")
        if self.eval_max_tokens and self.eval_seq_len - 1 > self.max_seq_len:
            raise PtekitError(f"--eval-seq-len {self.eval_seq_len} needs --max-seq-len {self.eval_seq_len} or more")


# --- the checkpoint -----------------------------------------------------------------------------


def resolve_model(opts: SuiteOptions) -> tuple[str, str]:
    """(name for the report, checkpoint argument for `ptekit export`)."""
    arg = MODELS.get(opts.model)
    if arg in RANDOM_MODELS:
        return arg, str(random_checkpoint_dir(opts.out / "checkpoints" / arg, RANDOM_MODELS[arg]))
    if arg:
        return opts.model, arg
    path = Path(opts.model)
    if not path.exists():
        raise PtekitError(f"--model {opts.model}: neither a known model ({', '.join(MODELS)}) nor a checkpoint path")
    return path.name, str(path)


def random_checkpoint_dir(d: Path, name: str = "llama3.2-1b") -> Path:
    """A Llama 3.2 shape (`name`: a params.json preset) with random bf16 weights and the real Llama 3
    tokenizer, in Meta's layout (consolidated.00.pth + params.json + tokenizer.model). Written once."""
    import shutil

    from exporter.checkpoint import random_checkpoint, save_meta_checkpoint
    from exporter.config import LLAMA32_PARAMS, preset
    from exporter.defaults import llama3_tokenizer

    if (d / "params.json").exists() and (d / "tokenizer.model").exists() and (d / "consolidated.00.pth").exists():
        return d
    cfg = preset(name)
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_meta_checkpoint(tmp, cfg, random_checkpoint(cfg), LLAMA32_PARAMS[name])
    shutil.copyfile(llama3_tokenizer(), tmp / "tokenizer.model")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)  # whole or absent: a half-written checkpoint is never mistaken for a finished one
    return d


# --- steps --------------------------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _save(path: Path, record: dict) -> dict:
    write_text(path, json.dumps(record, indent=2) + "\n")
    return record


def _run_rusage(cmd: list[str], what: str) -> dict:
    """Runs a command as its own process: wall and CPU seconds and peak RSS, from wait4's rusage,
    which is this child's alone (RUSAGE_CHILDREN would mix in every earlier child)."""
    import tempfile

    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fout, stderr=ferr)  # files: a full pipe cannot stall it
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        fout.seek(0), ferr.seek(0)
        out, err = fout.read().decode(errors="replace"), ferr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise PtekitError(f"{what} failed (exit {proc.returncode}): {(err or out).strip()[-800:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1)}


def export_cmd(checkpoint: str, out: Path, method: str, opts: SuiteOptions) -> list[str]:
    cmd = [sys.executable, "-m", "exporter.cli", "export", checkpoint, "-o", str(out), "--method", method,
           "--max-seq-len", str(opts.max_seq_len), "--quiet"]
    if opts.eval_max_tokens:
        cmd.append("--eval-method")  # so `ptekit eval` scores the file in windows; +a few KB
    if opts.steps is not None and registry.get(method).trains:
        cmd += ["--steps", str(opts.steps)]
    if opts.model in RANDOM_MODELS:
        for option in SIZE_RUN_OPTIONS.get(method, ()):
            cmd += ["-O", option]
    return cmd


def step_export(checkpoint: str, method: str, opts: SuiteOptions) -> dict:
    out = opts.out / method
    rec_path = out / "export.json"
    cmd = export_cmd(checkpoint, out, method, opts)
    done = _load(rec_path)
    if done and done.get("command") == _shown(cmd) and (out / "model.pte").exists():
        return done
    opts.echo(f"- export {method}: {_shown(cmd)}")
    run = _run_rusage(cmd, f"ptekit export --method {method}")
    man = json.loads((out / "manifest.json").read_text())
    return _save(rec_path, {"method": method, "command": _shown(cmd), "pte": str(out / "model.pte"),
                            "pte_bytes": man["pte_bytes"], **run, "stage_seconds": man["seconds"],
                            "lowering": {k: v for k, v in man["lowering"].items() if k != "methods"},
                            "source": man["source"], "model": man["model"]})


def _shown(cmd: list[str]) -> str:
    """The command as a user types it (the venv's python as `python`)."""
    return " ".join(["python" if c == sys.executable else (c if c and " " not in c else json.dumps(c)) for c in cmd])


def bench_options(opts: SuiteOptions):
    from android_runner.bench import BenchOptions

    return BenchOptions(prompt_len=opts.prompt_len, gen=opts.gen, runs=opts.runs, warmup=opts.warmup,
                        threads=_threads(opts))


def _threads(opts: SuiteOptions, host: bool = False) -> int:
    """--threads 0 means every core of the machine that runs the model: this machine's count for
    --device local and the llama.cpp peer (which runs here); on a phone, llama_main's -1 (its own
    count of the performance cores), never this machine's core count."""
    if opts.threads:
        return opts.threads
    return (os.cpu_count() or 1) if host or opts.device == "local" else -1


def _device(opts: SuiteOptions):
    from android_runner.device import AdbDevice, LocalDevice

    return LocalDevice() if opts.device == "local" else AdbDevice(serial=opts.device)


def step_bench(name: str, pte: Path, opts: SuiteOptions, tokenizer: Path | None = None) -> dict:
    from android_runner.bench import BenchFailure, bench

    rec_path = opts.out / name / "bench.json"
    settings = asdict(bench_options(opts))
    done = _load(rec_path)
    if done and done.get("complete") and all(done["settings"].get(k) == v for k, v in settings.items()) \
            and done["model"]["pte_bytes"] == Path(pte).stat().st_size:
        return done
    opts.echo(f"- bench {name} on {opts.device}")
    try:
        result = bench(Path(pte), _device(opts), opts.runner, bench_options(opts), tokenizer, progress=opts.progress)
    except BenchFailure as e:
        _save(rec_path, e.result)
        raise
    return _save(rec_path, result)


def step_quality(method: str, pte: Path, opts: SuiteOptions) -> dict | None:
    from exporter.evaluate import EvalOptions, evaluate

    if not opts.eval_max_tokens:
        return None
    rec_path = opts.out / method / "quality.json"
    done = _load(rec_path)
    want = {"seq_len": opts.eval_seq_len, "max_tokens": opts.eval_max_tokens}
    if done and done["target"].get("sha256") and all(done["window"].get(k) == v for k, v in want.items()):
        from exporter.manifest import file_sha256

        if done["target"]["sha256"] == file_sha256(pte):
            return done
    opts.echo(f"- eval {method}: ptekit eval {pte} --seq-len {opts.eval_seq_len} --max-tokens {opts.eval_max_tokens}")
    rec = evaluate(EvalOptions(target=str(pte), seq_len=opts.eval_seq_len, max_tokens=opts.eval_max_tokens,
                               progress=opts.progress), echo=lambda s: None)
    return _save(rec_path, rec)


def step_export_llama(checkpoint: str, ref_export: dict, opts: SuiteOptions) -> dict:
    from benchmarks.export_llama_peer import export_llama

    out = opts.out / "export_llama"
    rec_path = out / "export.json"
    done = _load(rec_path)
    if done and done.get("max_seq_len") == opts.max_seq_len and Path(done["pte"]).exists():
        return done
    opts.echo("- export_llama (ExecuTorch's own exporter, -qmode 8da4w -G 32 -E 8,0)")
    low = ref_export["lowering"]
    try:
        rec = export_llama(checkpoint, out, opts.max_seq_len, low["bos_id"], low["eos_ids"])
    except RuntimeError as e:
        raise PtekitError(f"export_llama on {checkpoint}: {str(e)[-800:]}") from None
    return _save(rec_path, {**rec, "max_seq_len": opts.max_seq_len, "wall_s": rec["seconds"],
                            "cpu_s": rec["cpu_seconds"], "pte_bytes": rec["bytes"]})


def step_llamacpp(gguf: Path, prompt: str, opts: SuiteOptions) -> dict:
    from benchmarks import llamacpp_peer

    rec_path = opts.out / "llamacpp" / "bench.json"
    want = {"prompt_len": opts.prompt_len, "gen": opts.gen, "runs": opts.runs, "threads": _threads(opts, host=True)}
    done = _load(rec_path)
    if done and done.get("settings") == want and done.get("gguf") == str(gguf):
        return done
    opts.echo(f"- llama.cpp on {gguf.name}")
    ensure_writable_dir(rec_path.parent)
    rec = llamacpp_peer.bench(gguf, prompt, opts.prompt_len, opts.gen, opts.runs, opts.warmup, _threads(opts, host=True))
    rec["parts"] = llamacpp_peer.gguf_parts(gguf)
    return _save(rec_path, {**rec, "settings": want})


# --- the whole run ------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "mem_total_mib": mem,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def run(opts: SuiteOptions) -> dict:
    from benchmarks import report, roofline

    opts.check()
    ensure_writable_dir(opts.out)
    name, checkpoint = resolve_model(opts)
    from exporter.checkpoint import load_checkpoint
    from exporter.defaults import embedded_gguf, resolve_checkpoint_arg
    from exporter.manifest import tool_versions

    cfg = load_checkpoint(resolve_checkpoint_arg(checkpoint)).config
    record = {"format": FORMAT, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": name, "checkpoint": checkpoint, "config": cfg.to_dict(), "machine": machine(),
              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()
                          if k not in ("echo", "progress")},
              "tools": tool_versions(), "methods": {}, "peers": {}}
    bw = roofline.measure_bandwidth()
    opts.echo(f"memory bandwidth: {bw['gb_per_s']} GB/s ({bw['method']})")
    record["bandwidth"] = bw

    for method in opts.methods:
        exp = step_export(checkpoint, method, opts)
        pte = Path(exp["pte"])
        entry = {"export": exp, "bench": step_bench(method, pte, opts)}
        entry["quality"] = step_quality(method, pte, opts)
        record["methods"][method] = entry
        _save(opts.out / "benchmarks.json", record)  # partial results survive a later failure

    ref = record["methods"].get("ptq") or next(iter(record["methods"].values()), None)
    if "export_llama" in opts.peers:
        if ref is None:
            raise PtekitError("--peers export_llama needs at least one ptekit method in --methods (for the tokenizer)")
        exp = step_export_llama(checkpoint, ref["export"], opts)
        tok = Path(ref["bench"]["model"]["tokenizer_files"][0])
        record["peers"]["export_llama"] = {"export": exp, "bench": step_bench("export_llama", Path(exp["pte"]), opts, tok)}
        _save(opts.out / "benchmarks.json", record)
    if "llamacpp" in opts.peers:
        gguf = opts.gguf or (embedded_gguf() if checkpoint == "smollm2-135m" else None)
        from benchmarks.llamacpp_peer import INSTALL, available

        if gguf is None:
            record["peers"]["llamacpp"] = {"skipped": f"no GGUF of {name}; pass --gguf FILE"}
        elif not available():
            record["peers"]["llamacpp"] = {"skipped": f"llama_cpp is not installed; {INSTALL}"}
        elif ref is None:
            record["peers"]["llamacpp"] = {"skipped": "needs a ptekit method's benchmark prompt"}
        else:
            record["peers"]["llamacpp"] = {"bench": step_llamacpp(Path(gguf), ref["bench"]["settings"]["prompt"], opts)}
        if "skipped" in record["peers"]["llamacpp"]:
            opts.echo(f"- llama.cpp skipped: {record['peers']['llamacpp']['skipped']}")

    record["roofline"] = report.roofline_rows(record)
    record["sizes"] = report.size_rows(record)
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _save(opts.out / "benchmarks.json", record)
    write_text(opts.out / "report.md", report.markdown(record))
    try:
        report.chart(record, opts.out / "chart.png")
    except ImportError:
        opts.echo("- no chart: matplotlib is not installed (pip install matplotlib; pyproject's `bench` extra)")
    return record
