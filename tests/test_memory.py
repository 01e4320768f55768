"""The export's memory check: an estimate from the checkpoint's shape, refused in one sentence before
any weight is read, instead of the kernel's out-of-memory kill."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.sizes import parameter_count
from exporter import memory
from exporter.config import preset
from exporter.errors import PtekitError
from quant.method import MethodInputs

GiB = 2**30


def needs(cfg_name: str, method: str, tmp_path, max_seq_len: int = 2048, kv_cache: str = "fp32",
          **options) -> list[memory.Need]:
    from exporter.pipeline import memory_needs

    cfg = preset(cfg_name).replace(max_seq_len=max_seq_len)
    inputs = MethodInputs(work_dir=tmp_path, device="cpu", options=options)
    return memory_needs(cfg, parameter_count(cfg), method, inputs, lowered=kv_cache)


def test_check_names_stage_need_available_and_what_lowers_it():
    big = memory.Need("quantize (qlora)", 30 * GiB, "-O qat_steps=0 (adapters only)")
    with pytest.raises(PtekitError) as e:
        memory.check([memory.Need("lower to XNNPACK", 5 * GiB), big], where="ckpt/", available=16 * GiB)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("ckpt/: the export needs about 30.0 GiB of memory at its peak (quantize (qlora))")
    assert "16.0 GiB available" in msg and "-O qat_steps=0" in msg and "--no-memory-check" in msg
    memory.check([big], where="ckpt/", available=31 * GiB)  # fits: no error


def test_estimates_for_the_llama32_shapes(tmp_path):
    """ptq's estimate covers the peaks benchmarks/export_memory.py measured (BENCHMARKS.md) and stays
    under a 16 GiB runner for the 3B shape; full QAT of 3B cannot fit 24 GiB and the message offers
    adapters only, whose estimate is far lower."""
    ptq_3b = max(n.bytes for n in needs("llama3.2-3b", "ptq", tmp_path))
    ptq_1b = max(n.bytes for n in needs("llama3.2-1b", "ptq", tmp_path))
    assert ptq_1b < ptq_3b < 16 * GiB
    qat = max(needs("llama3.2-3b", "qlora", tmp_path), key=lambda n: n.bytes)
    assert qat.bytes > 24 * GiB and "qat_steps=0" in qat.lower_it and "optimizer_state=bf16" in qat.lower_it
    # 1B's QAT round: AdamW's fp32 moments do not fit 24 GiB; in bf16 the estimate fits and still covers
    # the 18,993,996 kB peak measured for `ptekit eval` of one QAT step (micro-batches of 2 x 512, docs/qlora.md).
    qat_1b = max(needs("llama3.2-1b", "qlora", tmp_path, micro_batch="2"), key=lambda n: n.bytes)
    bf16_1b = max(n.bytes for n in needs("llama3.2-1b", "qlora", tmp_path, micro_batch="2", optimizer_state="bf16"))
    assert qat_1b.bytes > 24 * GiB and qat_1b.lower_it.startswith("-O optimizer_state=bf16")
    assert 18_993_996 * 1024 < bf16_1b < 22 * GiB
    adapters = max(n.bytes for n in needs("llama3.2-3b", "qlora", tmp_path, qat_steps="0", rotation="none"))
    assert adapters < qat.bytes - 8 * 3 * 10**9
    # Adapters on learned rotations (the default start): the rotation training's copies (7 bytes a parameter
    # beside the teacher's 4) are the peak, not the adapters' 8, nor GPTQ's calibration hidden states; with
    # the QAT round on, its AdamW state is, whatever the start.
    params_3b = parameter_count(preset("llama3.2-3b"))
    learned = max(n.bytes for n in needs("llama3.2-3b", "qlora", tmp_path, qat_steps="0"))
    assert learned - adapters == 3 * params_3b
    assert max(n.bytes for n in needs("llama3.2-3b", "qlora", tmp_path, rotation="hadamard")) == qat.bytes
    # On the Hadamard start the adapters' round is lighter than GPTQ's 2 x 256 x 512 calibration hidden
    # states of 3,072 floats (asymmetric calibration) beside the student and the teacher.
    hadamard = max(n.bytes for n in needs("llama3.2-3b", "qlora", tmp_path, qat_steps="0", rotation="hadamard"))
    assert hadamard == 8 * params_3b + 2 * 256 * 512 * 3072 * 4 + memory.RUNTIME_FLOOR > adapters
    # spinquant's paper preset on 1B: GPTQ's 128 x 2048 calibration hidden states (2 GiB), twice with asymmetric
    # calibration, on top of the fp32 model outgrow the rotation training's 7 bytes a parameter.
    def spin(**o):
        return next(n.bytes for n in needs("llama3.2-1b", "spinquant", tmp_path, preset="paper", **o)
                    if n.stage == "quantize (spinquant)")
    params = parameter_count(preset("llama3.2-1b"))
    assert spin(gptq_asymmetric="false") == 7 * params + memory.RUNTIME_FLOOR
    assert spin() == 4 * params + 2 * 128 * 2048 * 2048 * 4 + memory.RUNTIME_FLOOR > 7 * params + memory.RUNTIME_FLOOR
    # A longer KV cache is named as what to shorten when lowering is the larger need.
    long = memory.lowering_need(preset("llama3.2-1b"), 1_235_814_400, 131072)
    assert "--max-seq-len" in long.lower_it
    # An int8 cache (--kv-cache int8) is counted at its own bytes: 1B's 131,072 positions hold
    # 16 layers x 2 x 8 heads x (64 int8 values + an fp32 scale + an int8 zero point) a position less.
    lower = {kv: next(n.bytes for n in needs("llama3.2-1b", "ptq", tmp_path, max_seq_len=131072, kv_cache=kv)
                      if n.stage == "lower to XNNPACK") for kv in ("fp32", "int8")}
    assert lower["fp32"] - lower["int8"] == 131072 * 16 * 2 * 8 * (64 * 4 - (64 + 4 + 1))


def test_export_refuses_before_reading_weights(tiny_hf, tmp_path, monkeypatch):
    from exporter import checkpoint, pipeline

    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * 2**20)
    monkeypatch.setattr(checkpoint, "build_model", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(PtekitError, match=r"needs about .* GiB of memory at its peak .* and this machine has 0.1 GiB"):
        pipeline.export(tiny_hf, tmp_path / "out", "ptq", max_seq_len=256)
    assert not (tmp_path / "out").exists()


def test_cli_says_it_in_one_line(tiny_hf, tmp_path):
    """The installed command, with a machine that has almost nothing available (MemAvailable faked
    through the module the CLI reads it from)."""
    code = ("import sys; from exporter import memory; memory.available_bytes = lambda: 2**26; "
            "from exporter.cli import main; sys.argv = ['ptekit'] + sys.argv[1:]; main()")
    res = subprocess.run([sys.executable, "-c", code, "export", str(tiny_hf), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    # The stage line printed as loading starts, then the error: one line, no traceback.
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "needs about" in lines[-1] and "--no-memory-check" in lines[-1], res.stderr
    assert len(lines) <= 2 and "Traceback" not in res.stderr
