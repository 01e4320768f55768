"""Lowering: a (quantized) Transformer -> torch.export -> XNNPACK -> .pte bytes.

The .pte holds the KV cache as mutable buffers, uses ExecuTorch's custom cache-update and SDPA
ops, takes a dynamic number of tokens (prefill) and carries the metadata methods that
ExecuTorch's LLM runner reads.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import torch

from exporter import log
from exporter.model import Transformer
from exporter.runtime import EVAL_METHOD
from quant import fuse


@dataclass
class LowerOptions:
    max_seq_len: int = 2048
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    # A second method, forward_all_logits, returning every position's logits so `ptekit eval`
    # can score the file itself. It shares the weights with forward (the .pte grows by a few KB)
    # but costs about half again the lowering time, so it is opt-in.
    eval_method: bool = False
    # "int8": the KV cache as int8 per position and head, read by ExecuTorch's quantized attention. Not
    # exact (keys, values and queries are rounded to 8 bits), so opt-in: `ptekit eval` measures its cost.
    kv_cache: str = "fp32"
    progress: bool = False  # a bar per lowering phase on stderr


KV_CACHES = ("fp32", "int8")


def load_executorch_ops() -> None:
    """Registers the custom ops an LLM .pte uses, for tracing and for running it."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401


def prepare_for_export(model: Transformer, dtype: torch.dtype, kv_cache: str = "fp32") -> Transformer:
    model.last_logits_only = True
    fuse.fuse_qkv(model)
    model.setup_caches(dtype, kv_cache)
    # Every module with an ExecuTorch-only fast path (attention, the int8 embedding, online
    # Hadamard transforms) carries this flag.
    for m in model.modules():
        if hasattr(m, "use_executorch_ops"):
            m.use_executorch_ops = True
    # The .pte records each tensor's requires_grad; a trained model (qlora freezes its backbone) and the
    # same weights loaded from the work directory would otherwise lower to different bytes.
    return model.eval().requires_grad_(False)


def model_dtype(model: Transformer) -> torch.dtype:
    """bf16 when the method left the model in bf16 (the baseline), fp32 activations otherwise."""
    return torch.bfloat16 if model.norm.weight.dtype == torch.bfloat16 else torch.float32


def metadata(model: Transformer, opts: LowerOptions) -> dict:
    cfg = model.config
    md = {
        "get_max_seq_len": opts.max_seq_len,
        "get_max_context_len": opts.max_seq_len,
        "get_n_layers": cfg.n_layers,
        "get_vocab_size": cfg.vocab_size,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }
    if opts.bos_id is not None:
        md["get_bos_id"] = opts.bos_id
    if opts.eos_ids:
        md["get_eos_ids"] = list(opts.eos_ids)
    return md


def export_programs(model: Transformer, opts: LowerOptions, advance=lambda name: None) -> dict:
    """torch.export of the cached forward: tokens [1, S] (S dynamic), input_pos [1]."""
    load_executorch_ops()
    advance("torch.export forward")
    model = prepare_for_export(model, model_dtype(model), opts.kv_cache)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    seq = torch.export.Dim("seq_len", min=1, max=opts.max_seq_len - 1)
    programs = {}
    with torch.no_grad():
        programs["forward"] = torch.export.export(model, example, dynamic_shapes=({1: seq}, None), strict=False)
        if opts.eval_method:
            advance(f"torch.export {EVAL_METHOD}")
            model.last_logits_only = False
            programs[EVAL_METHOD] = torch.export.export(model, example, dynamic_shapes=({1: seq}, None), strict=False)
            model.last_logits_only = True
    return programs


# executorch 1.5.1's XNNPACK preprocess runs 17 passes over every delegated partition, and each ends by
# re-tracing the partition through fake tensors with the symbolic sequence length. Thirteen find nothing
# to change in ptekit's graphs: nine rewrite ops a Llama graph never holds (convolutions, batch norm,
# PReLU, bilinear upsampling, an SDPA pattern (the attention is ExecuTorch's custom op, outside the
# delegate), ReLU/hardtanh after an op, max pooling's getitem, dim-order ops (lowering runs with
# _skip_dim_order)), and four tidy up what the partitioner hands over (concatenations of more than five
# inputs, clones, redundant copies, constant subgraphs), none of which it hands over here. The .pte is
# byte-identical without them for every method (tests/test_export.py, test_spinquant.py, test_qlora.py
# re-lower with all 17). A SmolLM2 ptq export at max_seq_len 2048 took 221.6 s instead of 358 s
# (docs/lowering-time.md).
def _passes_without_effect_on_llms() -> tuple:
    from executorch.backends.transforms.remove_getitem_op import RemoveGetItemPass
    from executorch.backends.xnnpack import _passes as p
    from executorch.exir.passes.memory_format_ops_pass import DimOrderOpsRevertPass

    return (p.ConvertToUpsampleBilinear2d, p.ConvertToSDPAPass, p.FuseBatchNormPass, p.DecomposeBatchNorm,
            p.Conv1dUnsqueezePass, p.PReLUReshapePass, p.FuseActivationPass, RemoveGetItemPass,
            DimOrderOpsRevertPass, p.DecomposeConcatenate, p.XNNPACKRemoveCloneOpsTransform,
            p.RemoveRedundantCopyPass, p.ConstPropPass)


@contextlib.contextmanager
def xnnpack_passes_for_llms():
    """While lowering, XNNPACK's preprocess runs its default passes less _passes_without_effect_on_llms."""
    from executorch.backends.xnnpack import xnnpack_preprocess

    base = xnnpack_preprocess.XNNPACKPassManager
    skipped = _passes_without_effect_on_llms()

    class LlmPassManager(base):
        def __init__(self, exported_program, passes=None):
            super().__init__(exported_program, passes)
            if passes is None:  # the default list; an explicit one (export_llama's dqlinear partitions) is kept
                self.passes = [q for q in self.passes if q not in skipped]

    xnnpack_preprocess.XNNPACKPassManager = LlmPassManager
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager = base


def delegation_stats(edge) -> dict:
    """How many of forward's operators XNNPACK took, counted on the lowered edge graph."""
    ep = edge.exported_program("forward")
    delegated = 0
    outside = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            sub = getattr(ep.graph_module, node.args[0].target)
            delegated += sum(n.op == "call_function" for n in sub.original_module.graph.nodes)
        elif name not in ("getitem", "alloc") and not name.startswith("sym_"):
            outside[name] = outside.get(name, 0) + 1
    total = delegated + sum(outside.values())
    return {"ops_delegated": delegated, "ops_total": total, "share_delegated": round(delegated / max(total, 1), 4),
            "ops_outside": dict(sorted(outside.items()))}


def to_program(programs: dict, md: dict, bf16: bool = False, advance=lambda name: None):
    """(ExecuTorch program, delegation statistics); the program serializes when it is written."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        stack.enter_context(log.level(None, logging.WARNING))  # the root logger, for lowering only
        stack.enter_context(xnnpack_passes_for_llms())
        advance("to_edge_transform_and_lower (XNNPACK)")
        edge = to_edge_transform_and_lower(
            programs,
            # One greedy partitioner takes the dynamically quantized linears and the ops between
            # them; export_llama's two-pass setup costs a second round of decompositions.
            partitioner=[XnnpackPartitioner(enable_bf16=bf16)],
            compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
            constant_methods=md,
        )
        advance("to_executorch")
        et = edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                do_quant_fusion_and_const_prop=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            )
        )
    return et, delegation_stats(edge)


def lower(model: Transformer, opts: LowerOptions, on_phase=lambda name: None):
    """(ExecuTorch program, delegation statistics); write_pte writes the program. on_phase(name) is
    called as each phase starts (benchmarks.export_memory measures memory phase by phase with it)."""
    from exporter.progress import phases

    bf16 = model_dtype(model) == torch.bfloat16
    # torch.export of each method, then the edge/XNNPACK lowering, then emitting the program.
    with phases("lower", 1 + opts.eval_method + 2, enabled=opts.progress) as advance:
        def step(name):
            advance(name)
            on_phase(name)

        programs = export_programs(model, opts, step)
        return to_program(programs, metadata(model, opts), bf16=bf16, advance=step)


def write_pte(program, path) -> None:
    """Serializes the program straight into the file, chunk by chunk: `program.buffer` would join
    the whole .pte into one bytes object in memory first (2.4 GB more at the peak for a 3B model)."""
    with open(path, "wb") as fh:
        program.write_to_file(fh)
