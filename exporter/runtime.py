"""Running a .pte on this machine through ExecuTorch's own runtime (the pybindings)."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.errors import PtekitError
from exporter.openmp import one_thread_for_runtime_calls
from exporter.quiet import native_calls

EVAL_METHOD = "forward_all_logits"


def check_pte_header(path: Path) -> None:
    """An ExecuTorch program is a flatbuffer whose file identifier (bytes 4-8) is "ET" + a version."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[4:6] != b"ET":
        raise PtekitError(f"{path}: not a readable .pte (no ExecuTorch program header); is the file complete?")


def set_runtime_threads(n: int) -> None:
    """ExecuTorch's thread pool (XNNPACK's operators and the parallel loops of its other kernels) at n
    threads. The pybindings call it unsafe because it replaces the pool under any method that is running;
    between calls into the runtime, where every caller here sets it, nothing is."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(n)


def runtime_threads() -> int:
    """The size of ExecuTorch's thread pool (by default, the machine's cores)."""
    from executorch.extension.pybindings import portable_lib

    return portable_lib._threadpool_get_thread_count()


class PteModel:
    def __init__(self, path: str | Path, etdump: bool = False):
        from exporter.lower import load_executorch_ops

        self.path = Path(path)
        if not self.path.is_file():
            raise PtekitError(f"{self.path}: no such .pte file")
        check_pte_header(self.path)
        load_executorch_ops()
        from executorch.extension.pybindings.portable_lib import _load_for_executorch

        try:
            with native_calls():
                self._module = _load_for_executorch(str(self.path), enable_etdump=etdump)
            self.methods = set(self._module.method_names())
        except Exception as e:
            raise PtekitError(f"{self.path}: not a readable .pte; ExecuTorch cannot load it ({e}); re-export it") from None
        if "forward" not in self.methods:
            raise PtekitError(f"{self.path}: no 'forward' method; not an LLM .pte")

    def meta(self, name: str, default=None):
        if name not in self.methods:
            return default
        with native_calls(), one_thread_for_runtime_calls():
            out = self._module.run_method(name, ())
        return out if name == "get_eos_ids" else out[0]

    def metadata(self) -> dict:
        names = ["get_max_seq_len", "get_max_context_len", "get_n_layers", "get_vocab_size", "get_bos_id",
                 "get_eos_ids", "use_kv_cache", "use_sdpa_with_kv_cache", "enable_dynamic_shape"]
        return {n: self.meta(n) for n in names if n in self.methods}

    def forward(self, tokens: list[int], start: int, all_logits: bool = False) -> torch.Tensor:
        """Runs tokens at positions start..; returns logits [S, vocab] (all_logits) or [vocab]."""
        method = EVAL_METHOD if all_logits else "forward"
        if method not in self.methods:
            raise PtekitError(f"{self.path}: no '{method}' method; re-export with --eval-method")
        with native_calls(), one_thread_for_runtime_calls():
            out = self._module.run_method(method, (torch.tensor([tokens], dtype=torch.long), torch.tensor([start], dtype=torch.long)))[0]
        if all_logits:
            return out[0]
        # ptekit's files return [1, S, vocab]; export_llama's (a peer the benchmarks run) the last position's
        # [1, vocab]. Either way the last row.
        return out.reshape(-1, out.shape[-1])[-1]

    def write_etdump(self, path: Path) -> None:
        """The runtime's event trace of every execution so far (loaded with etdump=True)."""
        self._module.write_etdump_result_to_file(str(path))

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int], on_token=None) -> list[int]:
        """Greedy decoding, one prefill then one token per step."""
        max_len = int(self.meta("get_max_seq_len", 2048))
        if len(prompt_ids) >= max_len:
            raise PtekitError(f"prompt is {len(prompt_ids)} tokens; this .pte holds at most {max_len - 1}")
        logits = self.forward(prompt_ids, 0)
        pos, out = len(prompt_ids), []
        while len(out) < max_new_tokens and pos < max_len:
            nxt = int(logits.argmax())
            if nxt in eos_ids:
                break
            out.append(nxt)
            if on_token:
                on_token(nxt)
            logits = self.forward([nxt], pos)
            pos += 1
        return out
