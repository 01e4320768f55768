"""`ptekit eval`: how far a quantized model is from its BF16 original: perplexity, KL divergence,
top-1 agreement. The CLI's command and the benchmark suite both call evaluate().

The convention is the one perplexity papers (GPTQ, SpinQuant) and llama.cpp use on WikiText-2:
the raw test text joined as it is, tokenized once (no BOS inserted), cut into non-overlapping
windows of N tokens, each window scored on its own from position 0, so the first token of a
window is context and the other N-1 are predicted. The leftover tail shorter than N is dropped.

Per window: the target's mean negative log-likelihood, the mean KL(reference || target) of the
next-token distributions, and the share of positions where both pick the same top token. The
standard error of each is the spread over windows (std / sqrt(n_windows)); the difference in NLL
from the reference is paired window by window, so it is far tighter than either NLL alone, and it
is the number that tells two methods apart.

The reference is the checkpoint under the `bf16` method run eagerly: bf16 weights and bf16
activations, the model `ptekit export --method bf16` ships. (fp32 arithmetic on the same weights
would be an idealised model that nothing runs.) On a CPU without bf16 instructions the GEMMs run in
fp32 on the same bf16 numbers and round back to bf16 (Bf16GemmsInFp32), which PyTorch's own bf16
GEMM computes too, six times slower there. The target is the same or another checkpoint with a method applied (eager),
or a .pte run through ExecuTorch's runtime, so that the figure belongs to the file that ships.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from exporter import log
from exporter.atomic import ensure_writable_dir, write_text
from exporter.defaults import (
    CALIBRATION_FILE,
    EVAL_BATCH_TOKENS,
    EVAL_SEQ_LEN,
    PYTHON_DOCS,
    PYTHON_DOCS_FILE,
    WIKITEXT2,
    WIKITEXT2_FILES,
    WIKITEXT2_TEST,
    data_file,
    resolve_checkpoint_arg,
)
from exporter.errors import PtekitError
from exporter.manifest import file_sha256, read_manifest, tool_versions
from exporter.progress import bar as progress_bar
from quant import registry

_log = log.get(__name__)
# The calibration/training split (CALIBRATION_FILE, ../shared/data/README.md): scoring on it flatters
# every method that was fitted to it, so it is refused unless asked for.
CALIBRATION_SHA256 = WIKITEXT2_FILES[CALIBRATION_FILE]
REFERENCE_METHOD = registry.BASELINE


@dataclass
class EvalOptions:
    target: str  # checkpoint dir, .gguf, the embedded model's name, or a .pte
    method: str | None = None  # checkpoints: default "ptq"; a .pte: read from its manifest
    reference: str | None = None  # default: the target checkpoint, or the .pte's manifest source
    data: str = WIKITEXT2
    seq_len: int = EVAL_SEQ_LEN
    max_tokens: int | None = None
    allow_calibration_data: bool = False
    work_dir: Path | None = None  # for methods that optimize (spinquant, qlora)
    calibration: Path | None = None  # their calibration/training file, as `ptekit export --calibration`
    steps: int | None = None
    device: str = "auto"
    options: dict | None = None  # method options, as `ptekit export --option`
    batch_tokens: int = EVAL_BATCH_TOKENS
    # Eager targets: torchao's own fp32 path instead of bf16 GEMMs on pre-dequantized weights
    # (quant.eval_view); about 1.5x slower (190 s against 122-128 s measured), for checking the fast path.
    exact_eager: bool = False
    progress: bool = True
    memory_check: bool = True  # estimate a checkpoint target's peak first, as `ptekit export` does


# --- data --------------------------------------------------------------------------------------


def resolve_data(spec: str, allow_calibration: bool = False) -> Path:
    """`wikitext2` (the test split from the data directory), `python-docs` (shipped with ptekit) or a
    file; the calibration split is refused."""
    if spec == WIKITEXT2:
        return data_file(WIKITEXT2_TEST)  # or one line saying where it was looked for and how to get it
    if spec == PYTHON_DOCS:
        return PYTHON_DOCS_FILE
    path = Path(spec)
    if not path.is_file():
        raise PtekitError(f"{path}: data file not found; pass '{WIKITEXT2}', '{PYTHON_DOCS}' or a plain-text or JSONL file with --data")
    if not allow_calibration and (path.name == CALIBRATION_FILE or file_sha256(path) == CALIBRATION_SHA256):
        raise PtekitError(f"{path}: this is WikiText-2's validation split, the calibration/training data of the "
                          f"quantization methods; evaluate on '{WIKITEXT2}' (the test split), or pass "
                          "--allow-calibration-data if you mean it")
    return path


def read_text(path: Path) -> str:
    """The evaluation text, by the rules every text file follows (quant.data.read_text)."""
    from quant.data import read_text as read

    return read(path, "data file", "--data")


def make_windows(ids: list[int], seq_len: int, max_tokens: int | None, source: Path) -> torch.Tensor:
    """[n_windows, seq_len]: the first max_tokens tokens cut into whole windows."""
    if seq_len < 2:
        raise PtekitError(f"--seq-len {seq_len}: a window needs at least 2 tokens (one context, one predicted)")
    usable = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    n = usable // seq_len
    if n == 0:
        raise PtekitError(f"{source}: {usable} tokens{' (--max-tokens)' if max_tokens is not None else ''} make no "
                          f"window of {seq_len}; lower --seq-len or use more text")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# --- the models' logits ------------------------------------------------------------------------


class Bf16GemmsInFp32(torch.overrides.TorchFunctionMode):
    """Every bf16 F.linear computed in fp32 and its output rounded to bf16: what PyTorch's bf16 GEMM
    computes (bf16 inputs, fp32 accumulation, one rounding; tests/test_quality.py checks a GEMM
    agrees element for element but for the order of summation), on CPUs without bf16 instructions
    in a sixth of the time. The reference and eager targets keep bf16 weights and activations."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].dtype == torch.bfloat16:
            x, w, *rest = args
            b = rest[0] if rest else kwargs.get("bias")
            return F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
        return func(*args, **kwargs)


class EagerLogits:
    """A torch model on windows [B, N] -> logits [B, N-1, vocab] in fp32 (the last position predicts nothing)."""

    def __init__(self, model: torch.nn.Module, description: str):
        self.model = model
        self.description = description
        self.batched = True
        from quant.method import native_bf16

        self.gemms_in_fp32 = not native_bf16("cpu")

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        gemms = Bf16GemmsInFp32() if self.gemms_in_fp32 else contextlib.nullcontext()
        with torch.inference_mode(), gemms:
            return self.model(windows[:, :-1]).float()


class PteLogits:
    """A .pte through ExecuTorch's runtime, one window at a time (the program's batch is 1).

    With forward_all_logits a window is a prefill in chunks the program accepts; without it, each
    position is one decode step of `forward`, which returns only the last position's logits.
    """

    def __init__(self, pte, all_logits: bool | None = None):
        from exporter.runtime import EVAL_METHOD

        self.pte = pte
        self.all_logits = EVAL_METHOD in pte.methods if all_logits is None else all_logits
        self.max_seq_len = int(pte.meta("get_max_seq_len", 0) or 0)
        # The exported token dimension runs up to max_seq_len - 1 (exporter.lower).
        self.chunk = max(1, self.max_seq_len - 1)
        self.batched = False
        self.description = ("executorch runtime, forward_all_logits per window" if self.all_logits
                            else "executorch runtime, token by token through forward (no forward_all_logits)")

    def check_window(self, seq_len: int) -> None:
        if seq_len - 1 > self.max_seq_len:
            raise PtekitError(f"{self.pte.path}: holds {self.max_seq_len} positions, a window of {seq_len} needs "
                              f"{seq_len - 1}; pass --seq-len {self.max_seq_len + 1} or less, or re-export with "
                              f"--max-seq-len {seq_len}")

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._window(w[:-1].tolist()) for w in windows])

    def _window(self, tokens: list[int]) -> torch.Tensor:
        # Each window starts again at position 0: attention reads the cache only up to the
        # current position, so what an earlier window left there is never seen.
        if self.all_logits:
            parts = [self.pte.forward(tokens[s : s + self.chunk], s, all_logits=True)
                     for s in range(0, len(tokens), self.chunk)]
            return torch.cat(parts).float()
        return torch.stack([self.pte.forward([t], pos) for pos, t in enumerate(tokens)]).float()


# --- metrics -----------------------------------------------------------------------------------


def window_metrics(ref_logits: torch.Tensor, tgt_logits: torch.Tensor, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-window means [B] of the target's NLL, the reference's NLL, KL(ref || target), top-1 agreement."""
    out = {k: [] for k in ("nll", "ref_nll", "kl", "top1")}
    same = tgt_logits is ref_logits
    # One window at a time: the log-probabilities are tokens x vocab, and a batch of them for two
    # models would double the peak memory for nothing.
    for ref, tgt, w in zip(ref_logits, tgt_logits, windows):
        nxt = w[1:, None]
        logp = ref.log_softmax(-1)
        logq = logp if same else tgt.log_softmax(-1)
        out["ref_nll"].append(-logp.gather(-1, nxt).mean())
        out["nll"].append(-logq.gather(-1, nxt).mean())
        out["kl"].append(F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).mean())
        out["top1"].append((ref.argmax(-1) == tgt.argmax(-1)).float().mean())
    return {k: torch.stack(v).double() for k, v in out.items()}


def mean_se(values: torch.Tensor) -> dict:
    """Mean and its standard error over windows (None with a single window)."""
    v = values.double()
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "se": se}


def summarize(per_window: dict[str, torch.Tensor]) -> dict:
    nll, ref_nll = mean_se(per_window["nll"]), mean_se(per_window["ref_nll"])

    def ppl(s):
        # Windows hold equal token counts, so the mean of window means is the token mean.
        lo, hi = (None, None) if s["se"] is None else (math.exp(s["mean"] - 1.96 * s["se"]), math.exp(s["mean"] + 1.96 * s["se"]))
        return {"value": math.exp(s["mean"]), "ci95": [lo, hi]}

    return {
        "perplexity": ppl(nll),
        "nll": nll,
        "reference_perplexity": ppl(ref_nll),
        "reference_nll": ref_nll,
        "nll_delta": mean_se(per_window["nll"] - per_window["ref_nll"]),
        "kl": mean_se(per_window["kl"]),
        "top1_agreement": mean_se(per_window["top1"]),
    }


# --- loading the two sides ---------------------------------------------------------------------


def _eager(checkpoint: str, method: str, seq_len: int, opts: EvalOptions):
    """(Checkpoint, Tokenizer, model) with the method applied, as `ptekit export` would apply it."""
    from exporter.pipeline import load_for_method
    from quant.method import MethodInputs

    work = opts.work_dir or Path(f"{method}-work")

    def inputs_for(tok):
        return MethodInputs(work_dir=Path(work), tokenizer=tok, calibration=opts.calibration, device=opts.device,
                            steps=opts.steps, options=dict(opts.options or {}))

    # Positions 0..N-2 are run; the model's RoPE tables need that many.
    return load_for_method(checkpoint, method, inputs_for, max_seq_len=seq_len, memory_check=opts.memory_check)


def _same_checkpoint(a: str, b: str) -> bool:
    return resolve_checkpoint_arg(a).resolve() == resolve_checkpoint_arg(b).resolve()


def _pte_source(pte: Path, opts: EvalOptions) -> tuple[str, str]:
    """(reference checkpoint, the .pte's method) from the options and the manifest beside the .pte."""
    m = read_manifest(pte.parent) or {}
    method = m.get("method", "unknown")
    if opts.method is not None and m.get("method") not in (None, opts.method):
        raise PtekitError(f"{pte}: --method {opts.method}, but manifest.json says the file was exported with "
                          f"{method}; a .pte's method is fixed at export, drop --method")
    if opts.reference:
        return opts.reference, opts.method or method
    src = (m.get("source") or {}).get("path")
    if not src:
        raise PtekitError(f"{pte}: no manifest.json beside it naming the source checkpoint; pass --reference CHECKPOINT "
                          "(the BF16 checkpoint the .pte was exported from)")
    if not Path(src).exists():
        raise PtekitError(f"{pte}: manifest.json names the source checkpoint {src}, which is not here; "
                          "pass --reference CHECKPOINT")
    return src, method


def _check_tokenizers(ref_tok, other_path: Path | None, text: str) -> None:
    if other_path is None or Path(other_path).resolve() == Path(ref_tok.path).resolve():
        return
    from exporter.tokenizer import Tokenizer

    sample = text[:20000]
    if Tokenizer(other_path).encode(sample) != ref_tok.encode(sample):
        raise PtekitError(f"{other_path}: tokenizes the data differently from the reference's {ref_tok.path}; "
                          "KL and agreement need the same vocabulary, pass a matching --reference")


def _load_pte(opts: EvalOptions, echo):
    """(logits, target record, reference checkpoint, tokenizer beside the .pte or None)."""
    from exporter.generate import tokenizer_beside
    from exporter.runtime import PteModel

    path = Path(opts.target)
    logits = PteLogits(PteModel(path))
    reference, method = _pte_source(path, opts)
    logits.check_window(opts.seq_len)
    if not logits.all_logits:
        echo(f"note: {path} has no forward_all_logits method, so every position is one decode step "
             "(several times slower: 6x for SmolLM2-135M on 2 cores); re-export with --eval-method to score it in windows")
    try:
        tok = tokenizer_beside(path)
    except PtekitError:
        tok = None  # the vocabulary is still checked through the logits' shape
    record = {"path": str(path), "kind": "pte", "sha256": file_sha256(path), "method": method,
              "runtime": logits.description}
    return logits, record, reference, tok


# --- the evaluation ----------------------------------------------------------------------------


def evaluate(opts: EvalOptions, echo=None) -> dict:
    """Scores the target against the BF16 reference; returns the JSON record. echo: where the
    stage lines go (default: this module's logger)."""

    echo = echo or _log.info
    t_start, cpu_start = time.perf_counter(), time.process_time()
    data_path = resolve_data(opts.data, opts.allow_calibration_data)
    text = read_text(data_path)
    pte_side = _load_pte(opts, echo) if opts.target.endswith(".pte") else None
    reference = pte_side[2] if pte_side else (opts.reference or opts.target)
    method = pte_side[1]["method"] if pte_side else (opts.method or "ptq")

    echo(f"- load reference {reference} ({REFERENCE_METHOD}) ...")
    ref_ckpt, ref_tok, ref_model = _eager(reference, REFERENCE_METHOD, opts.seq_len, opts)
    ref = EagerLogits(ref_model, "eager torch, bf16 weights and activations")
    reference_record = {"path": str(reference), "sha256": ref_ckpt.sha256(), "method": REFERENCE_METHOD,
                        "runtime": ref.description}

    # Same weights, same method, same arithmetic: one pass serves both sides.
    target_is_reference = (pte_side is None and method == REFERENCE_METHOD
                           and _same_checkpoint(opts.target, reference))
    if pte_side:
        tgt, target_record, _, tgt_tok_path = pte_side
    elif target_is_reference:
        tgt, tgt_tok_path = ref, None
        target_record = {"path": opts.target, "kind": "checkpoint", "sha256": reference_record["sha256"],
                         "method": method, "runtime": ref.description}
    else:
        echo(f"- load target {opts.target} ({method}) ...")
        tgt_ckpt, tgt_tok, tgt_model = _eager(opts.target, method, opts.seq_len, opts)
        description = f"eager torch, {method} as the method leaves the model (torchao, fp32 GEMMs)"
        if not opts.exact_eager:
            from quant.eval_view import bf16_gemm_view

            tgt_model, n_views = bf16_gemm_view(tgt_model)
            if n_views:
                description = (f"eager torch, {method}: {n_views} quantized linears as bf16 GEMMs on their dequantized "
                               "weights, int8 per-token activation fake quantization (quant.eval_view)")
        tgt, tgt_tok_path = EagerLogits(tgt_model, description), tgt_tok.path
        target_record = {"path": opts.target, "kind": "checkpoint", "sha256": tgt_ckpt.sha256(), "method": method,
                         "runtime": tgt.description}
    _check_tokenizers(ref_tok, tgt_tok_path, text)

    ids = ref_tok.encode(text)
    windows = make_windows(ids, opts.seq_len, opts.max_tokens, data_path)
    t_loaded = time.perf_counter()

    per_window, seconds = _score(windows, ref, None if target_is_reference else tgt, opts)
    summary = summarize(per_window)
    n, N = windows.shape
    record = {
        "format": "ptekit-eval/1",
        "target": target_record,
        "target_is_reference": target_is_reference,
        "reference": reference_record,
        "data": {"path": str(data_path), "sha256": file_sha256(data_path), "tokens_in_text": len(ids),
                 "tokenizer": str(ref_tok.path)},
        "window": {"seq_len": N, "n_windows": n, "predicted_per_window": N - 1, "stride": N,
                   "max_tokens": opts.max_tokens},
        "metrics": summary,
        "tokens": {"evaluated": n * N, "predicted": n * (N - 1)},
        "seconds": {"load": round(t_loaded - t_start, 2), **seconds, "total": round(time.perf_counter() - t_start, 2)},
        # On a shared machine wall time says as much about the neighbours as about ptekit.
        "cpu_seconds": round(time.process_time() - cpu_start, 2),
        "threads": torch.get_num_threads(),
        "tools": tool_versions(),
    }
    return record


def _score(windows: torch.Tensor, ref: EagerLogits, tgt, opts: EvalOptions) -> tuple[dict, dict]:
    n, N = windows.shape
    batch = max(1, opts.batch_tokens // (N - 1))
    t_ref = t_tgt = t_metrics = 0.0
    parts = []
    with progress_bar(total=n * (N - 1), unit="tok", unit_scale=True, desc="eval", file=sys.stderr,
              disable=not opts.progress, dynamic_ncols=True) as bar:
        for i in range(0, n, batch):
            w = windows[i : i + batch]
            t0 = time.perf_counter()
            ref_logits = ref(w)
            t1 = time.perf_counter()
            tgt_logits = ref_logits if tgt is None else tgt(w)
            t2 = time.perf_counter()
            if tgt_logits.shape != ref_logits.shape:
                raise PtekitError(f"{opts.target}: gives logits of shape {tuple(tgt_logits.shape[1:])}, the reference "
                                  f"{tuple(ref_logits.shape[1:])}; the target and --reference are different models")
            with torch.inference_mode():
                parts.append(window_metrics(ref_logits, tgt_logits, w))
            del ref_logits, tgt_logits
            t_metrics += time.perf_counter() - t2
            t_ref, t_tgt = t_ref + t1 - t0, t_tgt + t2 - t1
            bar.update(len(w) * (N - 1))
    per_window = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return per_window, {"reference": round(t_ref, 2), "target": round(t_tgt, 2), "metrics": round(t_metrics, 2)}


# --- output ------------------------------------------------------------------------------------


def summary_line(r: dict) -> str:
    m = r["metrics"]
    t = r["target"]

    def pm(s, fmt):
        return f"{s['mean']:{fmt}}" + ("" if s["se"] is None else f" ± {s['se']:.2g}")

    ppl = m["perplexity"]
    ci = "" if ppl["ci95"][0] is None else f" [{ppl['ci95'][0]:.3f}, {ppl['ci95'][1]:.3f}]"
    where = "pte" if t["kind"] == "pte" else "eager"
    w = r["window"]
    return (f"{t['path']} {t['method']} ({where}) on {Path(r['data']['path']).name}, "
            f"{w['n_windows']} windows of {w['seq_len']}: PPL {ppl['value']:.3f}{ci} "
            f"(bf16 {m['reference_perplexity']['value']:.3f}, ΔNLL {pm(m['nll_delta'], '+.4f')}), "
            f"KL {pm(m['kl'], '.4g')}, top-1 {pm(m['top1_agreement'], '.4f')}; "
            f"{r['tokens']['predicted']} tokens in {r['seconds']['total']:.0f} s")


def write_record(path: Path, record: dict) -> None:
    path = Path(path)
    if path.parent != Path(""):
        ensure_writable_dir(path.parent)
    write_text(path, json.dumps(record, indent=2) + "\n")
