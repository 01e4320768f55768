"""The real export of a small model: .pte contents, determinism, atomicity, the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from exporter.checkpoint import build_model, load_checkpoint
from exporter.errors import PtekitError
from exporter.pipeline import export
from exporter.runtime import PteModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ptekit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, **kw)


def eager_quantized(checkpoint, max_seq_len):
    from quant.ptq import quantize

    with torch.no_grad():
        return quantize(build_model(load_checkpoint(checkpoint), max_seq_len=max_seq_len)).eval()


def test_pte_metadata_and_methods(tiny_ptq_pte):
    pte = PteModel(tiny_ptq_pte)
    md = pte.metadata()
    assert md["get_max_seq_len"] == 256 and md["get_n_layers"] == 2 and md["get_vocab_size"] == 49152
    assert md["use_kv_cache"] and md["enable_dynamic_shape"]
    assert md["get_bos_id"] == 1 and md["get_eos_ids"] == [2]
    assert {"forward", "forward_all_logits"} <= pte.methods
    manifest = json.loads((tiny_ptq_pte.parent / "manifest.json").read_text())
    assert manifest["method"] == "ptq" and manifest["pte_bytes"] == tiny_ptq_pte.stat().st_size
    assert manifest["lowering"]["share_delegated"] > 0.6
    assert (tiny_ptq_pte.parent / "tokenizer.json").exists()


def test_pte_logits_match_eager_quantized_model(tiny_hf, tiny_ptq_pte):
    """Tolerance met: max |logit difference| < 2% of the logit range, and the same argmax at >= 95% of positions."""
    model = eager_quantized(tiny_hf, 256)
    pte = PteModel(tiny_ptq_pte)
    tokens = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(tokens)[0]
    ours = pte.forward(tokens[0].tolist(), 0, all_logits=True)
    span = (eager.max() - eager.min()).item()
    assert (ours - eager).abs().max().item() < 0.02 * span
    assert (ours.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.95
    # forward (what the phone runs) returns the last position's logits, decoding step by step.
    assert torch.equal(pte.forward(tokens[0].tolist(), 0), ours[-1])
    step = pte.forward(tokens[0, :40].tolist(), 0)
    for i in range(40, 48):
        step = pte.forward([int(tokens[0, i])], i)
    torch.testing.assert_close(step, ours[-1], atol=1e-3 * span, rtol=0)


def test_two_exports_are_byte_identical(tiny_hf, tiny_ptq_pte, tmp_path):
    again = export(tiny_hf, tmp_path / "again", "ptq", max_seq_len=256, eval_method=True)
    assert again.pte.read_bytes() == tiny_ptq_pte.read_bytes()


def test_interrupted_export_leaves_no_pte(tiny_hf, tmp_path, monkeypatch):
    import exporter.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "lower", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export(tiny_hf, out, "ptq", max_seq_len=64)
    assert list(out.iterdir()) == []


def test_failed_write_leaves_no_pte(tiny_hf, tmp_path, monkeypatch):
    import exporter.pipeline as pipeline

    real = pipeline.lower
    monkeypatch.setattr(pipeline, "lower", lambda m, o: (real(m, o)[0][:100], {}))  # noqa: E731

    class Boom(Exception):
        pass

    def fail_manifest(*a, **k):
        raise Boom

    monkeypatch.setattr(pipeline.manifest, "file_sha256", fail_manifest)
    out = tmp_path / "out"
    with pytest.raises(Boom):
        export(tiny_hf, out, "ptq", max_seq_len=64)
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_outputs_get_the_mode_a_plain_open_gives(tmp_path):
    """Temp files are created 0600 (mkstemp); the renamed output must not stay private."""
    from exporter.atomic import atomic_dir, write_bytes

    umask = os.umask(0)
    os.umask(umask)
    write_bytes(tmp_path / "model.pte", b"x")
    with atomic_dir(tmp_path / "trained") as d:
        (d / "w").write_bytes(b"y")
    assert (tmp_path / "model.pte").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "trained").stat().st_mode & 0o777 == 0o777 & ~umask


def test_info_reports_delegation(tiny_ptq_pte):
    r = ptekit("info", tiny_ptq_pte)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["bytes"] == tiny_ptq_pte.stat().st_size and info["method"] == "ptq"
    assert info["execution"]["forward"]["xnnpack_delegate_calls"] >= 1
    assert "embedding_byte" in " ".join(info["execution"]["forward"]["portable_ops"])


# --- the CLI: one line and exit code 2 for each user error ---------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "/nonexistent/ckpt", "-o", "{tmp}/o"], "no such file or directory"),
        (["export", "{tiny}", "-o", "{tmp}/o", "--method", "magic"], "unknown method 'magic'"),
        (["export", "{tiny}", "-o", "/proc/ptekit-cannot-write"], "output directory is not writable"),
        (["generate", "{tmp}/missing.pte", "--prompt", "hi"], "no such .pte file"),
        (["info", "{tmp}/garbage.pte"], "not a readable .pte"),
        (["import-gguf", "{tmp}/garbage.pte", "{tmp}/o"], "not a readable GGUF file"),
        (["export", "{tiny}", "-o", "{tmp}/o", "--method", "spinquant", "--option", "rotation"], "expected KEY=VALUE"),
    ],
)
def test_cli_errors_are_one_line(args, message, tiny_hf, tmp_path):
    (tmp_path / "garbage.pte").write_bytes(b"\x00" * 128)
    r = ptekit(*[a.format(tmp=tmp_path, tiny=tiny_hf) for a in args])
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
