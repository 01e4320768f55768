"""`ptekit eval`: real runs on short slices of the real WikiText-2 test text.

The tiny model (2 layers, random weights, SmolLM2's tokenizer) is cheap to run but spends most of
its time on the 49k-word vocabulary, so slices are a few hundred tokens. SmolLM2 itself is under
@slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from exporter.errors import PtekitError
from exporter.evaluate import (
    EvalOptions,
    PteLogits,
    evaluate,
    make_windows,
    read_text,
    resolve_data,
    summary_line,
)


def run(target, **kw) -> dict:
    kw.setdefault("seq_len", 64)
    kw.setdefault("max_tokens", 512)
    return evaluate(EvalOptions(target=str(target), progress=False, **kw), echo=lambda s: None)


def test_bf16_against_itself_is_kl_zero(tiny_hf, tmp_path):
    # A copy under another path: both sides are loaded and run on their own, so this checks that
    # the two passes see the same windows and that the metrics are zero where they must be.
    twin = shutil.copytree(tiny_hf, tmp_path / "twin")
    r = run(tiny_hf, method="bf16", reference=str(twin))
    m = r["metrics"]
    assert r["target_is_reference"] is False
    assert r["window"]["n_windows"] == 8 and r["tokens"]["predicted"] == 8 * 63
    assert abs(m["kl"]["mean"]) < 1e-6
    assert m["top1_agreement"]["mean"] == 1.0 and m["top1_agreement"]["se"] == 0.0
    assert m["nll"]["mean"] == m["reference_nll"]["mean"] and m["nll_delta"]["mean"] == 0.0
    assert m["nll"]["se"] > 0 and 1 < m["perplexity"]["value"] < 1e6
    lo, hi = m["perplexity"]["ci95"]
    assert lo < m["perplexity"]["value"] < hi


def test_ptq_differs_measurably_from_bf16(tiny_hf):
    r = run(tiny_hf, method="ptq")
    m = r["metrics"]
    assert r["target"]["method"] == "ptq" and r["reference"]["method"] == "bf16"
    assert m["kl"]["mean"] > 1e-3 and m["kl"]["mean"] > 10 * m["kl"]["se"]
    assert m["top1_agreement"]["mean"] < 0.95
    assert m["top1_agreement"]["mean"] + 10 * m["top1_agreement"]["se"] < 1.0


def test_pte_agrees_with_eager_eval_of_the_same_quantized_model(tiny_hf, tiny_ptq_pte):
    # The .pte runs XNNPACK's int8 x int4 kernels, torch runs torchao's reference arithmetic; they
    # round the activations the same way, so what is left is summation order. Tolerances: 0.005
    # nats of NLL, 5% of the KL, 0.03 of agreement (seen on this model: 0.0011, 0.1%, 0.008; the
    # random model's flat distributions make its argmax fragile).
    kw = dict(seq_len=128, max_tokens=1024)
    pte = run(tiny_ptq_pte, **kw)
    eager = run(tiny_hf, method="ptq", **kw)
    assert pte["target"]["kind"] == "pte" and pte["target"]["method"] == "ptq"
    assert pte["reference"]["sha256"] == eager["reference"]["sha256"]  # the manifest's source, found
    assert "forward_all_logits" in pte["target"]["runtime"]
    p, e = pte["metrics"], eager["metrics"]
    assert p["reference_nll"] == e["reference_nll"]
    assert abs(p["nll"]["mean"] - e["nll"]["mean"]) < 0.005
    assert abs(p["kl"]["mean"] - e["kl"]["mean"]) < 0.05 * e["kl"]["mean"]
    assert abs(p["top1_agreement"]["mean"] - e["top1_agreement"]["mean"]) < 0.03


def test_pte_token_by_token_matches_windows(tiny_ptq_pte):
    from exporter.runtime import PteModel

    pte = PteModel(tiny_ptq_pte)
    w = torch.arange(1000, 1025)[None]
    whole = PteLogits(pte)(w)
    steps = PteLogits(pte, all_logits=False)(w)
    assert whole.shape == steps.shape == (1, 24, 49152)
    assert torch.equal(whole.argmax(-1), steps.argmax(-1))
    assert (whole - steps).abs().max() < 1e-4  # seen: 1.2e-6


def test_pte_windows_longer_than_the_cache_are_refused(tiny_ptq_pte):
    from exporter.runtime import PteModel

    with pytest.raises(PtekitError, match="--seq-len 257"):
        PteLogits(PteModel(tiny_ptq_pte)).check_window(300)


def test_pte_without_manifest_needs_reference(tiny_ptq_pte, tmp_path):
    lone = shutil.copy(tiny_ptq_pte, tmp_path / "model.pte")
    with pytest.raises(PtekitError, match="--reference"):
        run(lone)


def test_calibration_split_is_refused(wikitext_valid, tmp_path):
    with pytest.raises(PtekitError, match="validation split.*--allow-calibration-data"):
        resolve_data(str(wikitext_valid))
    renamed = shutil.copy(wikitext_valid, tmp_path / "mydata.txt")
    with pytest.raises(PtekitError, match="validation split"):
        resolve_data(str(renamed))
    assert resolve_data(str(renamed), allow_calibration=True) == renamed


def test_data_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(PtekitError, match="nope.txt: data file not found"):
        resolve_data(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(PtekitError, match=r"bad.jsonl:2: not valid JSON"):
        read_text(bad)
    bad.write_text('{"text": "fine"}\n\n{"title": "no text here"}\n')
    with pytest.raises(PtekitError, match=r"bad.jsonl:3: expected an object"):
        read_text(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(PtekitError, match="empty.txt: no text"):
        read_text(empty)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PtekitError, match="blob.txt: not UTF-8"):
        read_text(binary)


def test_jsonl_forms(tmp_path):
    f = tmp_path / "chat.jsonl"
    rows = [{"text": "plain"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"prompt": "2+2?", "response": "4"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_text(f) == "plain\n\nhi\nhello\n\n2+2?\n4"


def test_windows_drop_the_tail_and_respect_max_tokens(tmp_path):
    ids = list(range(1000))
    assert make_windows(ids, 128, None, tmp_path).shape == (7, 128)
    w = make_windows(ids, 100, 350, tmp_path)
    assert w.shape == (3, 100) and w[2, 0] == 200
    with pytest.raises(PtekitError, match="no window of 512"):
        make_windows(ids, 512, 300, tmp_path)


def test_cli_writes_record_and_summary(tiny_hf, wikitext_test, tmp_path):
    from exporter.checkpoint import load_checkpoint
    from exporter.manifest import file_sha256

    # A JSONL slice of the real test text, through the whole command line.
    data = tmp_path / "slice.jsonl"
    lines = [line for line in wikitext_test.read_text().splitlines() if line.strip()][:60]
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    out = tmp_path / "rec" / "eval.json"
    cmd = [sys.executable, "-m", "exporter.cli", "eval", str(tiny_hf), "-m", "ptq", "--data", str(data),
           "--seq-len", "64", "--max-tokens", "256", "--json", str(out), "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip()
    assert "\n" not in line and "PPL" in line and "KL" in line and "top-1" in line
    r = json.loads(out.read_text())
    assert line == summary_line(r)
    assert r["target"]["sha256"] == load_checkpoint(tiny_hf).sha256()
    assert r["data"]["sha256"] == file_sha256(data)
    assert r["window"] == {"seq_len": 64, "n_windows": 4, "predicted_per_window": 63, "stride": 64, "max_tokens": 256}
    for k in ("nll", "reference_nll", "nll_delta", "kl", "top1_agreement"):
        assert r["metrics"][k]["se"] is not None and r["metrics"][k]["se"] >= 0
    assert r["tokens"] == {"evaluated": 256, "predicted": 252}
    assert r["seconds"]["total"] > 0

    # Bad input: one line on stderr, exit code 2, no traceback.
    p = subprocess.run(cmd[:5] + ["--data", str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "missing.txt" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_smollm2_pte_agrees_with_eager(smollm2_hf, smollm2_ptq_pte):
    # The real model, 4 windows of 512: the .pte and torch's ptq agree within 0.01 nats of NLL
    # and 10% of the KL, and ptq is measurably off bf16.
    kw = dict(seq_len=512, max_tokens=2048)
    pte = run(smollm2_ptq_pte, **kw)
    eager = run(smollm2_hf, method="ptq", **kw)
    p, e = pte["metrics"], eager["metrics"]
    assert abs(p["nll"]["mean"] - e["nll"]["mean"]) < 0.01
    assert abs(p["kl"]["mean"] - e["kl"]["mean"]) < 0.1 * e["kl"]["mean"]
    assert p["kl"]["mean"] > 5 * p["kl"]["se"]
    assert 5 < p["reference_perplexity"]["value"] < 50  # SmolLM2-135M on WikiText-2 at 512


# --- the eager view of a quantized model (quant.eval_view) --------------------------------------


def test_fast_fake_quant_is_torchaos_bit_for_bit():
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant as torchao_fake_quant,
    )

    from quant.scheme import int8_per_token_fake_quant as _int8_per_token_fake_quant

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 96, generator=g) * 4 + 1
    x[0, 0] = 0  # an all-zero token: the scale's lower clamp
    x[0, 1] = x[0, 1].abs()  # all positive: the zero point's clamp
    x[0, 2] = -x[0, 2].abs()
    assert torch.equal(_int8_per_token_fake_quant(x), torchao_fake_quant(x))
    xb = x.bfloat16()  # the view's activations: bf16 in, computed in fp32
    assert torch.equal(_int8_per_token_fake_quant(xb), torchao_fake_quant(xb.float()))


def test_shared_fake_quant_is_recomputed_for_a_new_or_changed_input():
    from quant.eval_view import _LastInput

    last = _LastInput()
    a, b = torch.randn(2, 64), torch.randn(2, 64)
    qa = last.fake_quant(a)
    assert last.fake_quant(a) is qa
    assert not torch.equal(last.fake_quant(b), qa)
    b.mul_(3)  # in place: the version counter moves
    assert torch.allclose(last.fake_quant(b).float(), last.fake_quant(b.clone()).float())


def test_eager_view_scores_like_torchaos_exact_path(tiny_hf):
    # bf16 arithmetic instead of fp32 moves the figures by bf16 rounding only (seen here: NLL
    # +0.0012 nats, KL +0.16%; SmolLM2, 32 windows of 512: PPL +0.3%, KL +0.0017, 0.14 of its SE).
    kw = dict(method="ptq", seq_len=128, max_tokens=1024)
    fast, exact = run(tiny_hf, **kw), run(tiny_hf, exact_eager=True, **kw)
    assert "bf16 GEMMs" in fast["target"]["runtime"] and "fp32" in exact["target"]["runtime"]
    f, e = fast["metrics"], exact["metrics"]
    assert f["reference_nll"] == e["reference_nll"]
    assert abs(f["nll"]["mean"] - e["nll"]["mean"]) < 0.005
    assert abs(f["kl"]["mean"] - e["kl"]["mean"]) < 0.05 * e["kl"]["mean"]


def test_bf16_gemms_in_fp32_are_pytorchs_bf16_gemms():
    """What `ptekit eval` runs on CPUs without bf16 instructions: the same bf16 outputs as PyTorch's
    bf16 GEMM but where the two orders of summation round apart (seen: 0.01% of the elements, by
    one bf16 step), and every other op as it was."""
    from torch import nn

    from exporter.evaluate import Bf16GemmsInFp32

    torch.manual_seed(0)
    layer = nn.Linear(576, 1536).to(torch.bfloat16)
    x = torch.randn(2, 256, 576, dtype=torch.bfloat16)
    with torch.no_grad():
        native = layer(x)
        with Bf16GemmsInFp32():
            ours = layer(x)
            act = torch.nn.functional.silu(x)
    assert ours.dtype == torch.bfloat16 and ours.shape == native.shape
    fp32 = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
    assert torch.equal(ours, fp32)  # the mode took the call (here PyTorch's own bf16 GEMM differs from this)
    differ = ours != native
    assert differ.float().mean() < 1e-3
    one_step = native.float().abs() * 2**-7  # bf16 keeps 8 significant bits
    assert ((ours.float() - native.float()).abs()[differ] <= one_step[differ] + 1e-6).all()
    assert torch.equal(act, torch.nn.functional.silu(x))


def test_eager_view_keeps_the_online_hadamard():
    # SpinQuant's R4 linears carry their transform: dropping it would still run, and be wrong.
    from torch import nn
    from torchao.quantization import quantize_

    from quant import scheme
    from quant.eval_view import Bf16GemmLinear, bf16_gemm_view
    from quant.hadamard import HadamardInputLinear

    torch.manual_seed(0)
    model = nn.Sequential(HadamardInputLinear.wrap(nn.Linear(96, 64, bias=False)))
    x = torch.randn(4, 96)
    quantize_(model, scheme.block_linear_config())
    with torch.no_grad():
        exact = model(x)
        model, n = bf16_gemm_view(model)
        fast = model(x).float()
    assert n == 1 and isinstance(model[0], Bf16GemmLinear) and model[0].hadamard.h_p1.dtype == torch.float32
    assert (fast - exact).norm() < 0.02 * exact.norm()


def test_the_second_domain_is_shipped_as_its_readme_says():
    """`--data python-docs` resolves to the shipped file, whose size and hash are the README's."""
    from exporter.evaluate import PYTHON_DOCS, PYTHON_DOCS_FILE, resolve_data
    from exporter.manifest import file_sha256

    assert resolve_data(PYTHON_DOCS) == PYTHON_DOCS_FILE
    readme = (PYTHON_DOCS_FILE.parent / "README.md").read_text()
    assert file_sha256(PYTHON_DOCS_FILE) in readme
    assert f"{PYTHON_DOCS_FILE.stat().st_size:,} bytes" in readme


def test_eval_applies_the_method_with_the_calibration_file_given(tiny_hf, wikitext_valid, tmp_path):
    """`ptekit eval CHECKPOINT --method spinquant --calibration FILE` calibrates on FILE, as export would;
    without it the method learns on the model's own text."""
    options = dict(rotation="hadamard", gptq_samples="4", gptq_seq_len="32")
    for name, calibration in (("file", wikitext_valid), ("own", None)):
        work = tmp_path / name
        r = run(tiny_hf, method="spinquant", work_dir=work, calibration=calibration, options=options)
        assert r["metrics"]["kl"]["mean"] >= 0
        record = json.loads((work / "result" / "spinquant.json").read_text())["calibration"]
        assert record["text"] == name
        assert record["path"] == (str(wikitext_valid) if calibration else None)
