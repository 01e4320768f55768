"""The real export of a small model: .pte contents, determinism, atomicity, the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import relowered_unfused, relowered_with_every_xnnpack_pass, same_logits
from exporter.checkpoint import build_model, load_checkpoint
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
    # Not bit-equal: XNNPACK picks its kernels by CPU (one-row GEMV for a step, GEMM for a window), and
    # on AVX2-only x86 they round the int8 products differently (0.5% of the logit range measured).
    torch.testing.assert_close(step, ours[-1], atol=1e-2 * span, rtol=0)
    assert step.argmax() == ours[-1].argmax()


def test_int8_kv_cache_stays_close_to_the_fp32_cache(tiny_kv8_pte, tiny_ptq_pte):
    """--kv-cache int8: the same model with an int8 cache, run by ExecuTorch's quantized attention. Not
    exact (keys, values and queries are rounded to 8 bits per position and head), so the test bounds how
    far its logits move from the fp32 cache's file, prompt and decoded steps alike, and that they move."""
    import torch.nn.functional as F

    int8 = tiny_kv8_pte
    manifest = json.loads((int8.parent / "manifest.json").read_text())
    assert manifest["lowering"]["kv_cache"] == "int8"
    fp32, q = PteModel(tiny_ptq_pte), PteModel(int8)
    tokens = torch.randint(0, 49152, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    ref, ours = fp32.forward(tokens, 0, all_logits=True), q.forward(tokens, 0, all_logits=True)
    kl = F.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    # Measured: KL 0.0003, top-1 0.92 (this 2-layer model's logits are flat, so near-ties flip).
    assert kl.mean().item() < 0.01
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.85
    assert not torch.equal(ours, ref)  # the int8 attention ran, not the fp32 one
    # Decoding through the int8 cache: each step's keys and values are quantized as they are written.
    step = q.forward(tokens[:40], 0)
    for i in range(40, 48):
        step = q.forward([tokens[i]], i)
    span = (ref[-1].max() - ref[-1].min()).item()
    torch.testing.assert_close(step, ref[-1], atol=0.05 * span, rtol=0)


def test_int8_cache_quantizes_the_fused_projection_as_its_parts(tiny_hf, tiny_kv8_pte, tmp_path, monkeypatch):
    """The int8 cache quantizes the fused q/k/v output once; its rows are those of q, k and v apart."""
    unfused = relowered_unfused(tiny_kv8_pte.parent, tiny_hf, "ptq", tmp_path, monkeypatch, max_seq_len=256,
                                eval_method=True, kv_cache="int8")
    same_logits(tiny_kv8_pte, unfused)


def test_two_exports_are_byte_identical(tiny_hf, tiny_ptq_pte, tmp_path):
    again = export(tiny_hf, tmp_path / "again", "ptq", max_seq_len=256, eval_method=True)
    assert again.pte.read_bytes() == tiny_ptq_pte.read_bytes()


def test_xnnpack_passes_left_out_change_no_byte(tiny_hf, tiny_ptq_pte, tmp_path, monkeypatch):
    """exporter.lower leaves thirteen of XNNPACK's preprocess passes out (they find nothing to change in a
    Llama graph); with them the .pte is the same, for ptq here and for bf16, spinquant and qlora beside their
    exports."""
    every = relowered_with_every_xnnpack_pass(tiny_ptq_pte.parent, tiny_hf, "ptq", tmp_path, monkeypatch,
                                              max_seq_len=256, eval_method=True)
    assert every == tiny_ptq_pte.read_bytes()


def test_bf16_export_without_the_passes_is_byte_identical(tiny_hf, tmp_path, monkeypatch):
    done = export(tiny_hf, tmp_path / "bf16", "bf16", max_seq_len=128).out_dir
    every = relowered_with_every_xnnpack_pass(done, tiny_hf, "bf16", tmp_path, monkeypatch, max_seq_len=128)
    assert every == (done / "model.pte").read_bytes()


def test_fused_linears_compute_exactly_what_the_separate_ones_do(tiny_hf, tiny_ptq_pte, tmp_path, monkeypatch):
    """wq/wk/wv lower as one linear (quant.fuse): a different file, the same logits bit for bit."""
    unfused = relowered_unfused(tiny_ptq_pte.parent, tiny_hf, "ptq", tmp_path, monkeypatch, max_seq_len=256,
                                eval_method=True)
    assert unfused.read_bytes() != tiny_ptq_pte.read_bytes()
    same_logits(tiny_ptq_pte, unfused)


def test_bf16_fused_linears_are_exact(tiny_hf, tmp_path, monkeypatch):
    done = export(tiny_hf, tmp_path / "bf16", "bf16", max_seq_len=128).out_dir
    unfused = relowered_unfused(done, tiny_hf, "bf16", tmp_path, monkeypatch, max_seq_len=128)
    assert unfused.read_bytes() != (done / "model.pte").read_bytes()
    same_logits(done / "model.pte", unfused)


class Boom(Exception):
    pass


def tree(root) -> dict:
    """Every path under root -> its bytes (None for a directory): what a failed export must not change."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(Path(root).rglob("*"))}


@pytest.fixture
def quick_lower(tiny_ptq_pte, monkeypatch):
    """lower() answers with the bytes the real lowering wrote for tiny_ptq_pte, so each injected failure
    below costs a load and a quantization, not a lowering."""
    import exporter.pipeline as pipeline

    data = tiny_ptq_pte.read_bytes()
    delegation = {k: v for k, v in json.loads((tiny_ptq_pte.parent / "manifest.json").read_text())["lowering"].items()
                  if k not in ("backend", "methods", "bos_id", "eos_ids")}
    monkeypatch.setattr(pipeline, "lower", lambda model, opts, on_phase=None: (Lowered(data), delegation))
    return data


class Lowered:
    """Stands for an ExecuTorch program: writes the given .pte bytes."""

    def __init__(self, data: bytes):
        self.data = data

    def write_to_file(self, fh):
        fh.write(self.data)


@pytest.fixture
def previous_export(tiny_ptq_pte, tmp_path):
    """out/ holding an earlier export, a method's resume state and a file of the user's."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_ptq_pte.parent, out)
    # Its .pte differs from what the new export writes, so a test can tell which one is in place.
    (out / "model.pte").write_bytes(b"an earlier export's .pte")
    man = json.loads((out / "manifest.json").read_text())
    man.update(pte_bytes=len(b"an earlier export's .pte"), pte_sha256="earlier")
    (out / "manifest.json").write_text(json.dumps(man))
    (out / "ptq-work").mkdir()
    (out / "ptq-work" / "state.json").write_text('{"step": 3}')
    (out / "notes.txt").write_text("mine")
    return out


def inject(point, exc, monkeypatch):
    """Makes the export fail at `point` with `exc`, after doing part of that step's writing; returns the
    stage callback for export()."""
    import exporter.atomic as atomic
    import exporter.pipeline as pipeline

    def fail(*a, **k):
        raise exc

    if point == "pte":
        def half_pte(program, path):
            path.write_bytes(program.data[: len(program.data) // 2])
            raise exc
        monkeypatch.setattr(pipeline, "write_pte", half_pte)
    elif point == "tokenizer":
        def first_file_then_fail(ckpt, names, d):
            (d / names[0]).write_bytes(ckpt.tokenizer_path.with_name(names[0]).read_bytes()[:1000])
            raise exc
        monkeypatch.setattr(pipeline, "_copy_tokenizer", first_file_then_fail)
    elif point == "manifest":
        def half_manifest(d, record):
            (d / "manifest.json").write_text(json.dumps(record)[:50])
            raise exc
        monkeypatch.setattr(pipeline.manifest, "write_manifest", half_manifest)
    elif point == "swap":
        monkeypatch.setattr(atomic, "_exchange", fail)
    elif point == "fallback-swap":
        # Without RENAME_EXCHANGE: the old directory is moved aside, and the interruption comes
        # before the new one is renamed into place.
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(38, "ENOSYS")))
        real_rename, calls = atomic.os.rename, []

        def rename(src, dst):
            calls.append(src)
            if len(calls) == 2:
                raise exc
            real_rename(src, dst)
        monkeypatch.setattr(atomic.os, "rename", rename)
    return (lambda name: fail() if name == "write outputs" else None) if point == "after lowering" else (lambda name: None)


POINTS = ["after lowering", "pte", "tokenizer", "manifest", "swap", "fallback-swap"]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("point", POINTS)
def test_failed_reexport_leaves_the_previous_directory_untouched(point, exc, quick_lower, previous_export, tiny_hf,
                                                                 tmp_path, monkeypatch):
    before = tree(tmp_path)
    stage = inject(point, exc, monkeypatch)
    with pytest.raises(exc):
        export(tiny_hf, previous_export, "ptq", max_seq_len=256, eval_method=True, stage=stage)
    assert tree(tmp_path) == before  # no new file, no temp file, the old export and its neighbours intact


@pytest.mark.parametrize("point", POINTS)
def test_failed_export_into_a_new_directory_leaves_nothing(point, quick_lower, tiny_hf, tmp_path, monkeypatch):
    if point in ("swap", "fallback-swap"):
        # A new directory is renamed into place, not swapped: that rename is the step to break.
        monkeypatch.setattr("exporter.atomic.os.rename", lambda a, b: (_ for _ in ()).throw(Boom()))
        stage = lambda name: None  # noqa: E731
    else:
        stage = inject(point, Boom, monkeypatch)
    with pytest.raises(Boom):
        export(tiny_hf, tmp_path / "new" / "out", "ptq", max_seq_len=256, eval_method=True, stage=stage)
    assert list(tmp_path.iterdir()) == []


def test_reexport_replaces_the_outputs_and_keeps_the_rest(quick_lower, previous_export, tiny_hf, tmp_path):
    (previous_export / "tokenizer.model").write_bytes(b"from an older export")
    man = json.loads((previous_export / "manifest.json").read_text())
    man.update(tokenizer="tokenizer.model", tokenizer_files=["tokenizer.model"])
    (previous_export / "manifest.json").write_text(json.dumps(man))
    res = export(tiny_hf, previous_export, "ptq", max_seq_len=256, eval_method=True)
    names = sorted(p.name for p in previous_export.iterdir())
    assert names == ["manifest.json", "model.pte", "notes.txt", "ptq-work", "tokenizer.json", "tokenizer_config.json"]
    assert res.pte.read_bytes() == quick_lower
    assert res.manifest["pte_sha256"] == json.loads((previous_export / "manifest.json").read_text())["pte_sha256"] != "earlier"
    assert (previous_export / "ptq-work" / "state.json").read_text() == '{"step": 3}'
    assert (previous_export / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp directory beside it


def test_reexport_without_rename_exchange(quick_lower, previous_export, tiny_hf, tmp_path, monkeypatch):
    """Where the kernel or filesystem has no RENAME_EXCHANGE, two renames do the swap."""
    import exporter.atomic as atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(38, "ENOSYS")))
    export(tiny_hf, previous_export, "ptq", max_seq_len=256, eval_method=True)
    assert (previous_export / "notes.txt").exists() and (previous_export / "model.pte").read_bytes() == quick_lower
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_get_the_mode_a_plain_open_gives(tmp_path):
    """Temp files are created 0600 (mkstemp), and so are safetensors' files (an imported checkpoint, a
    method's saved weights); the renamed output must not stay private."""
    from safetensors.torch import save_file

    from exporter.atomic import atomic_dir, write_bytes

    umask = os.umask(0)
    os.umask(umask)
    write_bytes(tmp_path / "model.pte", b"x")
    with atomic_dir(tmp_path / "trained") as d:
        (d / "w").write_bytes(b"y")
        save_file({"a": torch.zeros(2)}, str(d / "model.safetensors"))
    assert (tmp_path / "model.pte").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "trained").stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("w", "model.safetensors"):
        assert (tmp_path / "trained" / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_shared_output_is_built_once_by_processes_that_need_it_together(tmp_path):
    """Two processes that need the same cached output at once (two ptekit runs importing one GGUF):
    the first builds it, the second waits for that build and reuses it instead of building again."""
    log, out = tmp_path / "log", tmp_path / "out"
    code = ("import pathlib, sys, time; from exporter.atomic import atomic_dir, shared_dir\n"
            "def build():\n"
            f"    open({str(log)!r}, 'a').write(sys.argv[1] + ' in\\n'); time.sleep(0.5)\n"
            f"    with atomic_dir(pathlib.Path({str(out)!r})) as tmp: (tmp / 'by').write_text(sys.argv[1])\n"
            f"    open({str(log)!r}, 'a').write(sys.argv[1] + ' out\\n')\n"
            f"print((shared_dir(pathlib.Path({str(out)!r}), build) / 'by').read_text())\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, name], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    builder = (out / "by").read_text()
    assert log.read_text().split() == [builder, "in", builder, "out"] and outputs == [builder, builder]


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
        (["export", "{tiny}", "-o", "{tmp}/o", "--kv-cache", "int4"], "--kv-cache int4: not a cache layout"),
        (["export", "{tiny}", "-o", "{tmp}/o", "--method", "bf16", "--kv-cache", "int8"], "takes fp32 activations"),
    ],
)
def test_cli_errors_are_one_line(args, message, tiny_hf, tmp_path):
    (tmp_path / "garbage.pte").write_bytes(b"\x00" * 128)
    r = ptekit(*[a.format(tmp=tmp_path, tiny=tiny_hf) for a in args])
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("point", ["weights", "config"])
def test_failed_gguf_import_leaves_the_previous_import_untouched(smollm2_gguf, tmp_path, monkeypatch, point, exc):
    import safetensors.torch

    import exporter.gguf_import as gguf_import

    out = tmp_path / "hf"
    gguf_import.import_gguf(smollm2_gguf, out)
    (out / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    if point == "weights":
        def half_written(sd, path, metadata=None):
            Path(path).write_bytes(b"\0" * 1000)
            raise exc
        monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    else:  # the weights are written, the config is not
        monkeypatch.setattr(gguf_import, "to_hf_config", lambda *a, **k: (_ for _ in ()).throw(exc()))
    with pytest.raises(exc):
        gguf_import.import_gguf(smollm2_gguf, out)
    assert tree(tmp_path) == before


def test_ctrl_c_during_the_swap_waits_for_it(quick_lower, previous_export, tiny_hf, tmp_path, monkeypatch):
    """A real SIGINT arriving while the directories are swapped: the swap and its cleanup finish, then
    the KeyboardInterrupt comes; the new export is whole and no temp directory is left."""
    import signal

    import exporter.atomic as atomic

    real = atomic._exchange

    def interrupted_exchange(a, b):
        os.kill(os.getpid(), signal.SIGINT)
        real(a, b)
    monkeypatch.setattr(atomic, "_exchange", interrupted_exchange)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_hf, previous_export, "ptq", max_seq_len=256, eval_method=True)
    assert (previous_export / "model.pte").read_bytes() == quick_lower
    man = json.loads((previous_export / "manifest.json").read_text())
    assert man["pte_bytes"] == len(quick_lower) and (previous_export / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
