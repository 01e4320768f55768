"""`ptekit bench`: the typer command, registered on exporter.cli's app."""

from __future__ import annotations

from pathlib import Path

import typer

from exporter.errors import PtekitError


def bench(
    models: list[Path] = typer.Argument(..., metavar="MODEL.pte...", help=".pte files made by `ptekit export`; with a bf16 one among them, the table shows the others relative to it."),
    device: str | None = typer.Option(None, "--device", "-d", help="An adb serial, or 'local' for this machine. Default: the one device `adb devices` lists."),
    runner: str | None = typer.Option(None, "--runner", help="ExecuTorch's llama_main built for the device (android_runner/README.md says how), or 'host': ptekit's runner with the same flags on ExecuTorch's Python bindings (the default for --device local, and what an emulated adb device runs)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Default: the tokenizer named in manifest.json beside the .pte."),
    prompt_len: int = typer.Option(64, "--prompt-len", help="Prompt length in tokens (WikiText-2 text, checked after tokenization); the model card uses 64."),
    gen: int = typer.Option(128, "--gen", help="Tokens to generate per run."),
    runs: int = typer.Option(5, "--runs", help="Measured runs; the table shows their median."),
    warmup: int = typer.Option(1, "--warmup", help="Runs before the measured ones, discarded (file cache, CPU clocks)."),
    threads: int = typer.Option(-1, "--threads", help="llama_main's --cpu_threads; -1: its default (the performance cores)."),
    cooldown: float = typer.Option(0.0, "--cooldown", help="Seconds to wait between runs so a phone starts each run cool."),
    timeout: float = typer.Option(900.0, "--timeout", help="Seconds one run may take."),
    json_out: Path | None = typer.Option(None, "--json", help="Write every run and the summary here (JSON)."),
    markdown_out: Path | None = typer.Option(None, "--markdown", help="Write the model-card table here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Decode and prefill tokens/s, time to first token, .pte size and peak RSS of .pte files,
    on an Android phone over adb or on this machine (--device local)."""
    from android_runner import report
    from android_runner.bench import BenchFailure, BenchOptions
    from android_runner.bench import bench as run_bench
    from android_runner.device import AdbDevice, LocalDevice
    from exporter.progress import set_quiet

    set_quiet(quiet)
    opts = BenchOptions(prompt_len=prompt_len, gen=gen, runs=runs, warmup=warmup, threads=threads,
                        cooldown_s=cooldown, timeout_s=timeout)
    opts.check()
    for m in models:
        if not m.is_file():
            raise PtekitError(f"{m}: no such .pte file; export one with `ptekit export`")
    results = []
    for m in models:
        dev = LocalDevice() if device == "local" else AdbDevice(serial=device)
        try:
            results.append(run_bench(m, dev, runner, opts, tokenizer, progress=not quiet))
        except BenchFailure as e:
            results.append(e.result)
            report.write(results, json_out, markdown_out)
            if any(r["runs"] for r in results):
                typer.echo(report.markdown(results))
            where = f"; finished runs are in {json_out}" if json_out and e.result["runs"] else ""
            raise PtekitError(f"{m}: {e}{where}" if len(models) > 1 else f"{e}{where}") from None
    report.write(results, json_out, markdown_out)
    typer.echo(report.markdown(results))
