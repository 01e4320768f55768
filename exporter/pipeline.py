"""checkpoint -> model -> method -> lower -> out/{model.pte, tokenizer, manifest.json}.

The one place where the steps meet; the CLI calls it, and so do the benchmarks.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter import manifest, memory
from exporter.atomic import atomic_dir, ensure_writable_dir
from exporter.checkpoint import Checkpoint, build_model, load_checkpoint
from exporter.defaults import resolve_checkpoint_arg
from exporter.errors import PtekitError
from exporter.lower import KV_CACHES, LowerOptions, lower, write_pte
from exporter.tokenizer import Tokenizer
from quant import registry
from quant.method import MethodInputs

PTE_NAME = "model.pte"


@dataclass
class ExportResult:
    out_dir: Path
    pte: Path
    manifest: dict
    seconds: dict


def load_for_method(checkpoint: str | Path, method: str, inputs_for: Callable[[Tokenizer | None], MethodInputs],
                    max_seq_len: int, stage=lambda name: None, memory_check: bool = True, lowered: str | None = None):
    """Loads the checkpoint and applies the method: (Checkpoint, tokenizer, quantized model).
    memory_check: first estimate the peak memory from the checkpoint's shape and refuse, with what
    would lower it, when this machine does not have it (exporter/memory.py); lowered: the KV cache
    layout (--kv-cache) of the lowering that follows, whose need counts too; None: not lowered."""
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise PtekitError(f"--max-seq-len {max_seq_len}: the KV cache needs at least 2 positions (prompt + one token)")
    spec = registry.get(method)
    stage("load checkpoint")
    ckpt = load_checkpoint(resolve_checkpoint_arg(str(checkpoint)))
    if ckpt.tokenizer_path is None:
        raise PtekitError(f"{ckpt.files[0].parent}: no tokenizer.json or tokenizer.model next to the weights")
    tok = Tokenizer(ckpt.tokenizer_path)
    inputs = inputs_for(tok)
    if memory_check:
        needs = memory_needs(ckpt.config.replace(max_seq_len=max_seq_len), ckpt.parameters, method, inputs, lowered)
        memory.check(needs, where=str(checkpoint))
    # The weights as stored (a bf16 checkpoint stays bf16 and memory-mapped); each method converts
    # what it needs, ptq one layer at a time, so the float model is never held whole twice.
    model = build_model(ckpt, max_seq_len=max_seq_len, dtype=None)
    ckpt.release_weights()
    stage(f"quantize ({method})")
    with nullcontext() if spec.trains else torch.no_grad():
        model = spec.quantize()(model, inputs)
    return ckpt, tok, model


def memory_needs(cfg, parameters: int, method: str, inputs: MethodInputs, lowered: str | None) -> list[memory.Need]:
    """What the method needs (its module's memory_need, when it has one), and lowering's, with a KV cache
    of layout `lowered`, unless it is None."""
    needs = [memory.lowering_need(cfg, parameters, cfg.max_seq_len, lowered)] if lowered else []
    if (method_need := registry.get(method).memory_need()) is not None:
        needs.append(method_need(cfg, parameters, inputs))
    return needs


def export(checkpoint: str | Path, out_dir: Path, method: str, max_seq_len: int = 2048, eval_method: bool = False,
           calibration: Path | None = None, device: str = "auto", steps: int | None = None, options: dict | None = None,
           stage=lambda name: None, progress: bool = False, on_phase=lambda name: None,
           memory_check: bool = True, kv_cache: str = "fp32") -> ExportResult:
    """stage(name): called as each step starts (the CLI prints them); on_phase(name): called as each
    step and each lowering phase starts (for measurements that need the finer split)."""
    check_kv_cache(kv_cache, method)
    # Not created yet: the directory appears at the end, whole, with every file in it.
    out_dir = ensure_writable_dir(Path(out_dir), create=False)
    seconds = {}
    t0 = time.perf_counter()

    def inputs_for(tok):
        return MethodInputs(work_dir=out_dir / f"{method}-work", tokenizer=tok, calibration=calibration,
                            device=device, steps=steps, options=options or {})

    def both(name):
        stage(name)
        on_phase(name)

    ckpt, tok, model = load_for_method(checkpoint, method, inputs_for, max_seq_len, both, memory_check,
                                       lowered=kv_cache)
    seconds["load_and_quantize"] = round(time.perf_counter() - t0, 2)

    stage("lower to XNNPACK")
    t1 = time.perf_counter()
    eos = ckpt.stop_ids(tok.eos_ids)
    opts = LowerOptions(max_seq_len=max_seq_len, bos_id=tok.bos_id, eos_ids=eos, eval_method=eval_method,
                        kv_cache=kv_cache, progress=progress)
    program, delegation = lower(model, opts, on_phase)
    del model  # the program holds the quantized weights now, packed for XNNPACK
    seconds["lower"] = round(time.perf_counter() - t1, 2)

    both("write outputs")
    tok_names = _tokenizer_names(ckpt)
    replaced = _export_file_names(out_dir) | {PTE_NAME, manifest.MANIFEST, *tok_names}
    # Staged beside out_dir and swapped in whole: the .pte, the tokenizer and the manifest appear
    # together or not at all, and until then a previous export there stays as it was. What else
    # is in out_dir (a method's resume state, the user's own files) is kept.
    with atomic_dir(out_dir, keep=lambda name: name not in replaced) as stage_dir:
        write_pte(program, stage_dir / PTE_NAME)
        del program
        _copy_tokenizer(ckpt, tok_names, stage_dir)
        seconds["total"] = round(time.perf_counter() - t0, 2)
        record = {
            "format": "ptekit-manifest/1",
            "pte": PTE_NAME,
            "pte_bytes": (stage_dir / PTE_NAME).stat().st_size,
            "pte_sha256": manifest.update_with_file(hashlib.sha256(), stage_dir / PTE_NAME).hexdigest(),
            "tokenizer": tok_names[0],
            "tokenizer_files": tok_names,
            "method": method,
            "scheme": _scheme_record(method),
            "source": {
                "path": str(resolve_checkpoint_arg(str(checkpoint))),
                "layout": ckpt.layout,
                "sha256": ckpt.sha256(),
            },
            "model": {**ckpt.config.to_dict(), "max_seq_len": max_seq_len,
                      "parameters": ckpt.parameters},
            "lowering": {"backend": "XNNPACK", "methods": ["forward"] + (["forward_all_logits"] if eval_method else []),
                         **delegation, "bos_id": opts.bos_id, "eos_ids": list(opts.eos_ids),
                         "kv_cache": kv_cache},
            "seconds": seconds,
            "tools": manifest.tool_versions(),
        }
        manifest.write_manifest(stage_dir, record)
    return ExportResult(out_dir, out_dir / PTE_NAME, record, seconds)


def check_kv_cache(kv_cache: str, method: str) -> None:
    """Before any weight is read: a cache layout the lowering knows, and one the method's activations fit."""
    if kv_cache not in KV_CACHES:
        raise PtekitError(f"--kv-cache {kv_cache}: not a cache layout; choose one of {', '.join(KV_CACHES)}")
    if kv_cache == "int8" and method == "bf16":
        raise PtekitError("--kv-cache int8: the bf16 method's .pte computes in bf16, and ExecuTorch's int8 "
                          "attention takes fp32 activations; export bf16 with --kv-cache fp32")


def _export_file_names(out_dir: Path) -> set[str]:
    """The files a previous export in out_dir wrote (its manifest says), which a new one replaces."""
    try:
        old = manifest.read_manifest(out_dir) or {}
    except (OSError, ValueError):
        return set()
    names = [old.get("pte"), *(old.get("tokenizer_files") or [old.get("tokenizer")])]
    return {n for n in names if isinstance(n, str) and n and "/" not in n}


def _scheme_record(method: str) -> dict:
    from quant import scheme

    if not registry.get(method).quantized:
        return {"name": f"{method} (unquantized)"}
    return {"name": scheme.NAME, **scheme.DESCRIPTION}


def _tokenizer_names(ckpt: Checkpoint) -> list[str]:
    """The tokenizer file, and tokenizer_config.json (chat template, special tokens) beside a tokenizer.json."""
    src = ckpt.tokenizer_path
    names = [src.name]
    if src.suffix == ".json" and src.with_name("tokenizer_config.json").exists():
        names.append("tokenizer_config.json")
    return names


def _copy_tokenizer(ckpt: Checkpoint, names: list[str], out_dir: Path) -> None:
    for name in names:
        shutil.copyfile(ckpt.tokenizer_path.with_name(name), out_dir / name)
