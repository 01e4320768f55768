"""What is inside a .pte: methods, metadata, size, and how much runs in XNNPACK."""

from __future__ import annotations

from pathlib import Path

from exporter.errors import PtekitError
from exporter.manifest import read_manifest


def describe(path: Path) -> dict:
    from executorch.exir._serialize._program import deserialize_pte_binary

    path = Path(path)
    if not path.is_file():
        raise PtekitError(f"{path}: no such .pte file")
    from exporter.runtime import check_pte_header

    check_pte_header(path)
    data = path.read_bytes()
    try:
        program = deserialize_pte_binary(data).program
    except Exception as e:
        raise PtekitError(f"{path}: not a readable .pte ({type(e).__name__}); is the file complete?") from None
    from exporter.runtime import PteModel

    pte = PteModel(path)
    plans = {}
    for plan in program.execution_plan:
        delegate_calls = 0
        kernel_ops: dict[str, int] = {}
        for chain in plan.chains:
            for ins in chain.instructions:
                kind = type(ins.instr_args).__name__
                if kind == "DelegateCall":
                    delegate_calls += 1
                elif kind == "KernelCall":
                    op = plan.operators[ins.instr_args.op_index]
                    name = op.name + (f".{op.overload}" if op.overload else "")
                    kernel_ops[name] = kernel_ops.get(name, 0) + 1
        if plan.name.startswith("get_") or plan.name in ("use_kv_cache", "use_sdpa_with_kv_cache", "enable_dynamic_shape"):
            continue
        plans[plan.name] = {
            "xnnpack_delegate_calls": delegate_calls,
            "portable_kernel_calls": sum(kernel_ops.values()),
            "portable_ops": dict(sorted(kernel_ops.items())),
            "backends": sorted({d.id for d in plan.delegates}),
        }
    out = {
        "file": str(path),
        "bytes": len(data),
        "mb": round(len(data) / 1e6, 2),
        "methods": sorted(pte.methods),
        "metadata": pte.metadata(),
        "execution": plans,
    }
    man = read_manifest(path.parent)
    if man and man.get("pte") == path.name:
        out["method"] = man["method"]
        lw = man["lowering"]
        out["ops_delegated_to_xnnpack"] = f"{lw['ops_delegated']}/{lw['ops_total']} ({lw['share_delegated']:.1%})"
    return out
