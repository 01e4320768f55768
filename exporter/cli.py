"""ptekit: BF16 Llama-family checkpoints -> quantized ExecuTorch .pte for Arm CPUs (XNNPACK).

The pipeline, one command per step: import-gguf -> export -> generate / info / eval / bench.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from android_runner.cli import bench as android_bench
from exporter import log
from exporter.defaults import DEFAULT_MODEL, EVAL_BATCH_TOKENS, EVAL_SEQ_LEN, PYTHON_DOCS, WIKITEXT2
from exporter.errors import PtekitError
from quant import registry

_log = log.get(__name__)
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=(
        "Export Llama-family checkpoints to quantized ExecuTorch .pte files for Arm CPUs (XNNPACK), "
        "and measure them.\n\n"
        f"Quick start: ptekit export {DEFAULT_MODEL} -o out/ --method ptq && "
        'ptekit generate out/model.pte --prompt "What is the capital of France?"'
    ),
)

METHOD_HELP = registry.help_text()


@app.callback()
def root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show the libraries' own logging (ExecuTorch's and the tokenizer's C++ lines, Python warnings).")):
    from exporter import quiet

    log.setup()
    quiet.for_command(verbose)


class Stages:
    """One line per pipeline step with its elapsed time, on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.name, self.t = quiet, None, time.perf_counter()

    def __call__(self, name: str):
        self._close()
        self.name, self.t = name, time.perf_counter()
        if not self.quiet:
            _log.info(f"- {name} ...")

    def _close(self):
        if self.name and not self.quiet:
            _log.info(f"  {self.name}: {time.perf_counter() - self.t:.1f} s")

    def done(self):
        self._close()
        self.name = None


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help=f"A checkpoint directory (Meta: params.json + consolidated.*.pth; Hugging Face: config.json + *.safetensors), a llama .gguf file, or '{DEFAULT_MODEL}' for the embedded default model."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory: model.pte, the tokenizer, manifest.json."),
    method: str = typer.Option("ptq", "--method", "-m", help=METHOD_HELP),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", help="KV cache length in the .pte (prompt + generated tokens)."),
    kv_cache: str = typer.Option("fp32", "--kv-cache", help="KV cache in the .pte: fp32 (exact: float in the model's dtype, so bf16 with --method bf16), or int8 (a scale and zero point per position and head, as export_llama's --quantize_kv_cache: on SmolLM2 it decoded faster from about 1,000 positions of context on and prefilled several times slower; not exact, so measure it with `ptekit eval` on the .pte). See BENCHMARKS.md."),
    eval_method: bool = typer.Option(False, "--eval-method/--no-eval-method", help="Also export forward_all_logits (shares the weights, +a few KB) so `ptekit eval` scores the .pte in windows instead of token by token; lowering takes about 1.5x as long."),
    calibration: Path | None = typer.Option(None, "--calibration", "--data", help="Calibration/training text or JSONL. Without it both methods learn on text the model writes itself, so no domain is favoured: spinquant learns its rotations and calibrates GPTQ on it, qlora distills from the BF16 model on it. With it, spinquant learns its rotations on the file and calibrates GPTQ on the file and as many self-written windows (-O gptq_data); qlora fine-tunes on it: cross-entropy on its targets (chat JSONL: the assistant turns) + distillation from the BF16 model."),
    device: str = typer.Option("auto", "--device", help="Where spinquant/qlora optimize: auto (CUDA when present), cpu or cuda."),
    option: list[str] | None = typer.Option(None, "--option", "-O", help="A method option KEY=VALUE, repeatable (spinquant: rotation=learned|hadamard|none, gptq=false, gptq_asymmetric=false (plain GPTQ), iterations=N, preset=cpu|paper...; qlora: preset=cpu|paper, rotation=learned|hadamard|none, train_text=generated|mixed, autocast=false|true (bf16 matmuls; default: where the device multiplies bf16), rank=N, qat_steps=N, lora_steps=N...). See the method's module docstring in quant/."),
    steps: int | None = typer.Option(None, "--steps", help="Optimization steps for spinquant/qlora (default: the method's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the result line: no stage lines or progress bars (the methods' training loops included)."),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check", help="Before reading any weight, estimate the export's peak memory from the checkpoint's shape and stop, saying what lowers it, when this machine does not have that much available."),
):
    """Quantize a checkpoint with METHOD and lower it to an XNNPACK .pte."""
    from exporter.pipeline import export as run_export
    from exporter.progress import set_quiet
    from quant.method import parse_options

    set_quiet(quiet)
    log.setup(quiet)
    stages = Stages(quiet)
    res = run_export(checkpoint, out, method, max_seq_len=max_seq_len, eval_method=eval_method, kv_cache=kv_cache,
                     calibration=calibration, device=device, steps=steps, options=parse_options(option),
                     stage=stages, progress=not quiet, memory_check=memory_check)
    stages.done()
    m = res.manifest
    typer.echo(f"{res.pte}  {m['pte_bytes'] / 1e6:.1f} MB  method={method}  "
               f"delegated {m['lowering']['share_delegated']:.0%} of ops to XNNPACK  ({res.seconds['total']:.0f} s)")


@app.command("import-gguf")
def import_gguf_cmd(
    gguf_file: Path = typer.Argument(..., help="A llama-architecture .gguf file: tensors F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 or the K-quants Q2_K to Q6_K (the i-quants and ternary types are refused)."),
    out_dir: Path = typer.Argument(..., help="Where to write config.json, model.safetensors, tokenizer.json."),
):
    """Dequantize a llama GGUF into the Hugging Face layout (bf16 safetensors + tokenizer.json)."""
    from exporter.atomic import ensure_writable_dir
    from exporter.gguf_import import import_gguf

    ensure_writable_dir(out_dir.parent if out_dir.parent != Path("") else Path("."))
    out = import_gguf(gguf_file, out_dir)
    typer.echo(f"{out}: config.json, model.safetensors, tokenizer.json")


@app.command()
def generate(
    model: Path = typer.Argument(..., help="A .pte made by `ptekit export`."),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Default: the tokenizer named in manifest.json beside the .pte."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt in the tokenizer's chat template when it has one."),
):
    """Run a .pte on this machine through ExecuTorch's runtime (greedy decoding)."""
    from exporter import openmp

    openmp.runtime_process()  # before torch loads libgomp
    from exporter.generate import generate_text

    generate_text(model, prompt, max_new_tokens, tokenizer, chat, echo=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    typer.echo("")


@app.command()
def info(model: Path = typer.Argument(..., help="A .pte file.")):
    """Methods, metadata, size and XNNPACK delegation of a .pte."""
    from exporter.inspect_pte import describe

    typer.echo(json.dumps(describe(model), indent=2))


@app.command("eval")
def eval_command(
    target: str = typer.Argument(..., help="A checkpoint (directory, .gguf, or 'smollm2-135m'), evaluated eagerly with --method applied; or a .pte, run through ExecuTorch's runtime."),
    method: str | None = typer.Option(None, "--method", "-m", help=f"For a checkpoint: {', '.join(registry.METHODS)} (default ptq, as `ptekit export`). For a .pte it is read from manifest.json."),
    reference: str | None = typer.Option(None, "--reference", help="The BF16 checkpoint to compare against, run eagerly in bf16. Default: the target checkpoint, or for a .pte the source recorded in manifest.json beside it."),
    data: str = typer.Option(WIKITEXT2, "--data", help=f"'{WIKITEXT2}' (WikiText-2's raw test split from the data directory: --data FILE, $PTEKIT_DATA, else ~/.cache/ptekit/data), '{PYTHON_DOCS}' (Python's standard-library docstrings, shipped with ptekit: technical text no method trains on) or a plain-text or JSONL file (\"text\", \"messages\", or \"prompt\"+\"response\" per line)."),
    seq_len: int = typer.Option(EVAL_SEQ_LEN, "--seq-len", help=f"Window length N (default {EVAL_SEQ_LEN}): the text is tokenized once and cut into non-overlapping windows of N tokens, each scored from position 0 (N-1 tokens predicted per window)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Use only the first N tokens of the data (default: all of it)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full record (hashes, every metric with its standard error, timings) here."),
    allow_calibration_data: bool = typer.Option(False, "--allow-calibration-data", help="Allow WikiText-2's validation split, the text qlora's -O train_text=mixed trains on (refused by default: scores on it are flattering)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="For spinquant/qlora: where the method keeps what it learns (default: ./<method>-work)."),
    calibration: Path | None = typer.Option(None, "--calibration", help="For spinquant/qlora: their calibration/training file, as `ptekit export --calibration` (default: text the model writes itself)."),
    steps: int | None = typer.Option(None, "--steps", help="For spinquant/qlora: optimization steps (default: the method's)."),
    device: str = typer.Option("auto", "--device", help="For spinquant/qlora: where they optimize: auto (CUDA when present), cpu or cuda."),
    option: list[str] | None = typer.Option(None, "--option", "-O", help="A method option KEY=VALUE, repeatable (spinquant: rotation=learned|hadamard|none, gptq=false, iterations=N, preset=cpu|paper...; qlora: rank=N, ...). See the method's module docstring in quant/."),
    batch_tokens: int = typer.Option(EVAL_BATCH_TOKENS, "--batch-tokens", help="Eager path: about this many tokens per forward (memory: 4 bytes x vocab per token per model)."),
    exact_eager: bool = typer.Option(False, "--exact-eager", help="Eager quantized target: torchao's own path (fp32 GEMMs, weights dequantized on every call; about 1.5x slower) instead of bf16 GEMMs on weights dequantized once, the reference's arithmetic."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the result line: no progress bars or stage lines (the methods' training loops included)."),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check", help="For a checkpoint: before reading any weight, estimate the method's peak memory from the checkpoint's shape and stop, saying what lowers it, when this machine does not have that much available."),
):
    """Perplexity, KL divergence from the BF16 model, and top-1 agreement with it, each with its standard error over windows."""
    from exporter.evaluate import EvalOptions, evaluate, summary_line, write_record
    from exporter.progress import set_quiet
    from quant.method import parse_options

    set_quiet(quiet)
    log.setup(quiet)
    opts = EvalOptions(target=target, method=method, reference=reference, data=data, seq_len=seq_len,
                       max_tokens=max_tokens, allow_calibration_data=allow_calibration_data, work_dir=work_dir,
                       calibration=calibration,
                       steps=steps, device=device, options=parse_options(option), batch_tokens=batch_tokens,
                       exact_eager=exact_eager, progress=not quiet, memory_check=memory_check)
    record = evaluate(opts)
    if json_out is not None:
        write_record(json_out, record)
    typer.echo(summary_line(record))


app.command("bench")(android_bench)  # the command lives with the harness in android_runner/


def main():
    try:
        app()
    except PtekitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; no partial outputs were left behind", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
