"""`ptekit eval`: the command line of benchmarks.quality."""

from __future__ import annotations

from pathlib import Path

import typer

from benchmarks.quality import BATCH_TOKENS, DEFAULT_SEQ_LEN, PYTHON_DOCS, WIKITEXT2
from quant import registry


def eval_command(
    target: str = typer.Argument(..., help="A checkpoint (directory, .gguf, or 'smollm2-135m'), evaluated eagerly with --method applied; or a .pte, run through ExecuTorch's runtime."),
    method: str | None = typer.Option(None, "--method", "-m", help=f"For a checkpoint: {', '.join(registry.METHODS)} (default ptq, as `ptekit export`). For a .pte it is read from manifest.json."),
    reference: str | None = typer.Option(None, "--reference", help="The BF16 checkpoint to compare against, run eagerly in bf16. Default: the target checkpoint, or for a .pte the source recorded in manifest.json beside it."),
    data: str = typer.Option(WIKITEXT2, "--data", help=f"'{WIKITEXT2}' (WikiText-2's raw test split from the data directory: --data FILE, $PTEKIT_DATA, else ~/.cache/ptekit/data), '{PYTHON_DOCS}' (Python's standard-library docstrings, shipped with ptekit: technical text no method trains on) or a plain-text or JSONL file (\"text\", \"messages\", or \"prompt\"+\"response\" per line)."),
    seq_len: int = typer.Option(DEFAULT_SEQ_LEN, "--seq-len", help=f"Window length N (default {DEFAULT_SEQ_LEN}): the text is tokenized once and cut into non-overlapping windows of N tokens, each scored from position 0 (N-1 tokens predicted per window)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Use only the first N tokens of the data (default: all of it)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full record (hashes, every metric with its standard error, timings) here."),
    allow_calibration_data: bool = typer.Option(False, "--allow-calibration-data", help="Allow WikiText-2's validation split, the data the methods calibrate and train on (refused by default: scores on it are flattering)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="For spinquant/qlora: where the method keeps what it learns (default: ./<method>-work)."),
    steps: int | None = typer.Option(None, "--steps", help="For spinquant/qlora: optimization steps (default: the method's)."),
    device: str = typer.Option("auto", "--device", help="For spinquant/qlora: where they optimize: auto (CUDA when present), cpu or cuda."),
    option: list[str] | None = typer.Option(None, "--option", "-O", help="A method option KEY=VALUE, repeatable (spinquant: rotation=learned|hadamard|none, gptq=false, iterations=N, preset=cpu|paper...; qlora: rank=N, ...). See the method's module docstring in quant/."),
    batch_tokens: int = typer.Option(BATCH_TOKENS, "--batch-tokens", help="Eager path: about this many tokens per forward (memory: 4 bytes x vocab per token per model)."),
    exact_eager: bool = typer.Option(False, "--exact-eager", help="Eager quantized target: torchao's own path (fp32 GEMMs, weights dequantized on every call; about 1.5x slower) instead of bf16 GEMMs on weights dequantized once, the reference's arithmetic."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the result line: no progress bars or stage lines (the methods' training loops included)."),
):
    """Perplexity, KL divergence from the BF16 model, and top-1 agreement with it, each with its standard error over windows."""
    from benchmarks.quality import EvalOptions, evaluate, summary_line, write_record
    from exporter import log
    from exporter.progress import set_quiet
    from quant.method import parse_options

    set_quiet(quiet)
    log.setup(quiet)
    opts = EvalOptions(target=target, method=method, reference=reference, data=data, seq_len=seq_len,
                       max_tokens=max_tokens, allow_calibration_data=allow_calibration_data, work_dir=work_dir,
                       steps=steps, device=device, options=parse_options(option), batch_tokens=batch_tokens,
                       exact_eager=exact_eager, progress=not quiet)
    record = evaluate(opts)
    if json_out is not None:
        write_record(json_out, record)
    typer.echo(summary_line(record))
