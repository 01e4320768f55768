"""spinquant: Hadamard matrices, rotation invariance, Cayley SGD, the quantized training loss,
resume after an interruption, reuse of the saved result, and the real .pte against the eager model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import (
    SHARED_DATA,
    cached_dir,
    relowered_unfused,
    relowered_with_every_xnnpack_pass,
    same_logits,
    write_tiny_hf,
)
from exporter.checkpoint import Checkpoint, build_model, load_checkpoint, random_checkpoint
from exporter.config import ModelConfig
from exporter.errors import PtekitError
from quant import rotation
from quant.cayley import CayleySGD
from quant.hadamard import OnlineHadamard, factor, hadamard_matrix, random_hadamard
from quant.method import MethodInputs

# FFN 96 = 12 x 8: R4 needs the Kronecker construction; head_dim 16.
TINY96 = dict(hidden_dim=96)
TINY_OPTIONS = dict(iterations=3, train_batch=1, train_seq_len=32, gptq_samples=4, gptq_seq_len=32,
                    init_eval_batches=1)


def orthogonality_error(x: torch.Tensor) -> float:
    eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
    return (x.double().transpose(-1, -2) @ x.double() - eye).abs().max().item()


@pytest.fixture(scope="module")
def tiny96_hf(smollm2_hf) -> Path:
    return cached_dir("tiny96-hf", lambda d: write_tiny_hf(d, smollm2_hf, **TINY96))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """A slice of the validation split: enough windows for the tiny runs, quick to tokenize."""
    text = (SHARED_DATA / "wikitext-2-valid-tokens.txt").read_text(encoding="utf-8-sig")[:30000]
    path = tmp_path_factory.mktemp("calib") / "valid-slice.txt"
    path.write_text(text)
    return path


def tiny_float_model(dtype=torch.float64):
    cfg = ModelConfig(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192, vocab_size=300,
                      rope_theta=1e5, tie_embeddings=True, max_seq_len=64)  # dim 96 = 12 x 8, hd 24 = 12 x 2
    return build_model(Checkpoint(cfg, random_checkpoint(cfg, dtype=torch.float32), None, [], "meta")).to(dtype)


# --- Hadamard ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 64, 96, 576, 1536, 3072])
def test_hadamard_matrices_are_orthonormal_with_pm_entries(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_factorization_of_llm_sizes():
    assert factor(1536) == (12, 128)  # SmolLM2's FFN
    assert factor(576) == (36, 16)  # SmolLM2's residual stream
    assert factor(8192) == (1, 8192)  # Llama 3.2 1B/3B's FFN
    assert factor(14336) == (28, 512)  # Llama 3 8B's FFN
    assert factor(52) is None


@pytest.mark.parametrize("n", [64, 96, 1536])
def test_online_hadamard_eager_and_executorch_op_agree(n):
    from exporter.lower import load_executorch_ops

    load_executorch_ops()
    mod = OnlineHadamard(n)
    x = torch.randn(2, 5, n)
    ref = (x.double() @ hadamard_matrix(n)).float()
    torch.testing.assert_close(mod(x), ref, atol=1e-5, rtol=1e-5)
    mod.use_executorch_ops = True
    torch.testing.assert_close(mod(x), ref, atol=1e-5, rtol=1e-5)


# --- rotations ----------------------------------------------------------------------------------------


def test_folded_rotated_model_computes_the_same_logits():
    """R1, R2 and the online R4 (FFN 192 = 12 x 16) leave the float network's function unchanged."""
    model = tiny_float_model()
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(tokens)
    rotation.fold_norms(model)
    assert all((layer.attention_norm.weight == 1).all() for layer in model.layers)
    rotation.insert_r4(model)
    g = torch.Generator().manual_seed(1)
    r1 = random_hadamard(96, g)
    r2 = torch.stack([random_hadamard(24, g) for _ in range(2)])
    rotation.apply_rotations(model, r1, r2)
    out = model(tokens)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # ... and the weights really moved.
    assert not torch.allclose(model.tok_embeddings.weight, tiny_float_model().tok_embeddings.weight, atol=1e-3)


def test_fake_quantized_linear_equals_torchao_scheme():
    """The training loss quantizes weights and activations exactly as the .pte's torchao weights do."""
    from torchao.quantization import quantize_

    from quant import fake_quant, scheme

    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    x = torch.randn(2, 9, 128) * torch.linspace(0.1, 5, 128)
    ours = nn.functional.linear(fake_quant.act(x), fake_quant.block_weight(lin.weight))
    quantize_(lin, scheme.block_linear_config())
    torch.testing.assert_close(ours, lin(x), atol=1e-5, rtol=1e-5)
    # Straight-through: gradients pass as if there were no rounding.
    w = torch.randn(8, 64, requires_grad=True)
    fake_quant.block_weight(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


# --- Cayley SGD -----------------------------------------------------------------------------------------


def test_cayley_sgd_stays_orthogonal_and_descends():
    g = torch.Generator().manual_seed(0)
    target = random_hadamard(48, g).float()
    x = nn.Parameter(torch.stack([torch.eye(48), random_hadamard(48, g).float()]))  # a batch, like R2
    opt = CayleySGD([x], lr=1.5)
    losses = []
    for _ in range(60):
        loss = ((x - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert orthogonality_error(opt.state[x]["master"]) < 1e-12
    assert orthogonality_error(x.detach()) < 1e-5
    assert losses[-1] < 0.5 * losses[0]


# --- the method -----------------------------------------------------------------------------------------


def inputs(work, tok, calibration, **options):
    return MethodInputs(work_dir=Path(work), tokenizer=tok, calibration=calibration,
                        options={**TINY_OPTIONS, **options})


def test_interrupted_optimization_resumes_to_the_same_rotations(tiny96_hf, calibration, tmp_path):
    from exporter.tokenizer import Tokenizer
    from quant import data, spinquant

    ckpt = load_checkpoint(tiny96_hf)
    tok = Tokenizer(ckpt.tokenizer_path)
    # One probe step per start: step 1 belongs to the start probe, steps 2-4 to the saved run.
    s = spinquant.settings_from(inputs(tmp_path, tok, calibration, iterations=4, init_probe=1))
    pool = data.windows(data.token_stream(calibration, tok), s.train_seq_len, s.seed)

    def folded():
        m = build_model(ckpt, max_seq_len=64)
        spinquant._prepare(m, s)
        return m

    full = spinquant.learn_rotations(folded(), pool, s, tmp_path / "a", "fp", progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_two(step, loss):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        spinquant.learn_rotations(folded(), pool, s, tmp_path / "b", "fp", on_step=stop_after_two, progress=False)
    steps_seen = []
    resumed = spinquant.learn_rotations(folded(), pool, s, tmp_path / "b", "fp",
                                        on_step=lambda step, loss: steps_seen.append(step), progress=False)
    assert steps_seen == [3, 4]  # it did not start over
    torch.testing.assert_close(resumed[0], full[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed[1], full[1], atol=1e-6, rtol=0)
    assert resumed[2]["losses"] == pytest.approx(full[2]["losses"], abs=1e-4)
    assert len(full[2]["losses"]) == 4
    # A state from another model or other settings is neither picked up nor overwritten: the run
    # stops, naming the work directory and how to start over.
    before = (tmp_path / "b" / spinquant.STATE).read_bytes()
    with pytest.raises(PtekitError, match=rf"other settings.*delete {re.escape(str(tmp_path / 'b'))} to start over"):
        spinquant.learn_rotations(folded(), pool, s, tmp_path / "b", "other", progress=False)
    assert (tmp_path / "b" / spinquant.STATE).read_bytes() == before
    (tmp_path / "b" / spinquant.STATE).write_bytes(b"not a torch file")
    with pytest.raises(PtekitError, match=rf"cannot be read.*delete {re.escape(str(tmp_path / 'b'))} to start over"):
        spinquant.learn_rotations(folded(), pool, s, tmp_path / "b", "fp", progress=False)


def test_auto_start_goes_on_from_the_start_whose_first_steps_have_the_lower_loss(tiny96_hf, calibration, tmp_path):
    import dataclasses

    from exporter.tokenizer import Tokenizer
    from quant import data, spinquant

    ckpt = load_checkpoint(tiny96_hf)
    tok = Tokenizer(ckpt.tokenizer_path)
    s = spinquant.settings_from(inputs(tmp_path, tok, calibration, iterations=3, init_probe=2))
    pool = data.windows(data.token_stream(calibration, tok), s.train_seq_len, s.seed)

    def learn(settings, name):
        m = build_model(ckpt, max_seq_len=64)
        spinquant._prepare(m, settings)
        return spinquant.learn_rotations(m, pool, settings, tmp_path / name, name, progress=False)

    auto = learn(s, "auto")
    record = auto[2]
    assert record["init_probe"] == 2 and set(record["init_losses"]) == {"identity", "hadamard"}
    assert len(record["losses"]) == 3  # the probe's two steps are the run's first two
    fixed = {name: learn(dataclasses.replace(s, init=name), name) for name in ("identity", "hadamard")}
    for name, (_, _, rec) in fixed.items():  # each start's score is the mean of its own first two losses
        assert record["init_losses"][name] == pytest.approx(sum(rec["losses"][:2]) / 2, abs=1e-4)
    best = min(record["init_losses"], key=record["init_losses"].get)
    assert record["init"] == best
    # Going on from the probe is the same run as starting there.
    torch.testing.assert_close(auto[0], fixed[best][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(auto[1], fixed[best][1], atol=1e-6, rtol=0)
    assert record["losses"] == pytest.approx(fixed[best][2]["losses"], abs=1e-4)


@pytest.fixture(scope="module")
def tiny_spinquant_pte(tiny96_hf, calibration, tmp_path_factory):
    from exporter.pipeline import export

    out = tmp_path_factory.mktemp("spinquant")
    res = export(tiny96_hf, out, "spinquant", max_seq_len=128, eval_method=True, calibration=calibration,
                 options=TINY_OPTIONS)
    return res


def test_export_saves_rotations_checkpoint_and_manifest(tiny_spinquant_pte):
    from safetensors.torch import load_file

    from quant import spinquant

    work = tiny_spinquant_pte.out_dir / "spinquant-work" / spinquant.RESULT
    manifest = json.loads((work / "spinquant.json").read_text())
    assert manifest["rotations"] == {"R1": True, "R2": True, "R4_online_hadamard": True, "file": "rotations.safetensors"}
    assert manifest["init"] in ("identity", "hadamard") and len(manifest["losses"]) == 3
    assert manifest["weights"]["block_linears"] == "GPTQ"
    rot = load_file(str(work / "rotations.safetensors"))
    assert orthogonality_error(rot["R1"]) < 1e-5 and orthogonality_error(rot["R2"]) < 1e-5
    assert rot["R2"].shape == (2, 16, 16)
    ckpt = load_file(str(work / "model.safetensors"))
    q = ckpt["layers.0.feed_forward.w2.qdata"]
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    assert tiny_spinquant_pte.manifest["method"] == "spinquant"


def test_rerun_loads_the_saved_result_and_pte_matches_it(tiny_spinquant_pte, tiny96_hf, calibration, monkeypatch):
    """Lowering again needs no optimization; the .pte's logits match the eager rotated, quantized model,
    whose block weights hold GPTQ's integers exactly."""
    from safetensors.torch import load_file

    from exporter.pipeline import load_for_method
    from exporter.runtime import PteModel
    from quant import spinquant

    def fail(*a, **k):
        raise AssertionError("optimized again instead of loading the saved result")

    monkeypatch.setattr(spinquant, "learn_rotations", fail)
    monkeypatch.setattr(spinquant, "gptq_model", fail)
    work = tiny_spinquant_pte.out_dir / "spinquant-work"
    _, tok, model = load_for_method(tiny96_hf, "spinquant", lambda t: inputs(work, t, calibration), 128)

    saved = load_file(str(work / spinquant.RESULT / "model.safetensors"))
    for name in ("layers.0.attention.wq", "layers.1.feed_forward.w2"):
        w = model.get_submodule(name).weight
        assert torch.equal(w.qdata, saved[f"{name}.qdata"]) and torch.equal(w.scale, saved[f"{name}.scale"])
    assert isinstance(model.layers[0].feed_forward.w2.hadamard, OnlineHadamard)

    ids = tok.encode("The tower is 324 metres tall, about the same height as an 81-storey building. " * 2)
    with torch.no_grad():
        eager = model(torch.tensor([ids]))[0]
    pte = PteModel(tiny_spinquant_pte.pte)
    ours = pte.forward(ids, 0, all_logits=True)
    span = (eager.max() - eager.min()).item()
    assert (ours - eager).abs().max().item() < 0.02 * span
    assert (ours.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.95
    assert torch.equal(pte.forward(ids, 0), ours[-1])


def test_xnnpack_passes_left_out_change_no_byte_of_the_spinquant_pte(tiny_spinquant_pte, tiny96_hf, calibration,
                                                                      tmp_path, monkeypatch):
    """The online Hadamard transforms and folded norms lower to the same bytes without those passes."""
    every = relowered_with_every_xnnpack_pass(tiny_spinquant_pte.out_dir, tiny96_hf, "spinquant", tmp_path,
                                              monkeypatch, max_seq_len=128, eval_method=True,
                                              calibration=calibration, options=TINY_OPTIONS)
    assert every == tiny_spinquant_pte.pte.read_bytes()


def test_fused_linears_of_the_rotated_model_are_exact(tiny_spinquant_pte, tiny96_hf, calibration, tmp_path,
                                                       monkeypatch):
    unfused = relowered_unfused(tiny_spinquant_pte.out_dir, tiny96_hf, "spinquant", tmp_path, monkeypatch,
                                max_seq_len=128, eval_method=True, calibration=calibration, options=TINY_OPTIONS)
    assert unfused.read_bytes() != tiny_spinquant_pte.pte.read_bytes()
    same_logits(tiny_spinquant_pte.pte, unfused)


def test_bad_options_and_files_are_one_clear_error(tmp_path, calibration):
    from quant import spinquant

    model = tiny_float_model(torch.float32)
    with pytest.raises(PtekitError, match="unknown option 'iters'"):
        spinquant.quantize(model, MethodInputs(work_dir=tmp_path, options={"iters": 3}))
    with pytest.raises(PtekitError, match="rotation='spin'"):
        spinquant.quantize(model, MethodInputs(work_dir=tmp_path, options={"rotation": "spin"}))
    with pytest.raises(PtekitError, match="not a boolean"):
        spinquant.quantize(model, MethodInputs(work_dir=tmp_path, options={"r4": "maybe"}))
    with pytest.raises(PtekitError, match="calibration file not found"):
        spinquant.quantize(model, MethodInputs(work_dir=tmp_path, calibration=tmp_path / "nope.txt"))
    if not torch.cuda.is_available():
        with pytest.raises(PtekitError, match="no CUDA GPU"):
            spinquant.quantize(model, MethodInputs(work_dir=tmp_path, device="cuda"))


def test_layer_checkpointing_gives_the_same_loss_and_gradients():
    """The GPU preset recomputes each block in the backward pass; that must not change anything."""
    from quant import spinquant

    model = tiny_float_model(torch.float32)
    rotation.fold_norms(model)
    rotation.insert_r4(model)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for ckpt in (False, True):
        loss_fn = spinquant.QuantizedLoss(model, "cpu", checkpoint_layers=ckpt, bf16=False)
        r1, r2 = (nn.Parameter(t.float()) for t in spinquant.random_rotations(model.config, 0))
        loss = loss_fn(tokens, r1, r2)
        loss.backward()
        results.append((loss.detach(), r1.grad, r2.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0


def test_calibration_files(tmp_path):
    from quant import data

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "first document"}\n\n{"prompt": "a", "response": "b"}\n"plain string"\n')
    assert data.read_text(jsonl) == "first document\n\na\nb\n\nplain string"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(PtekitError, match="bad.jsonl:2: not valid JSON"):
        data.read_text(bad)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(PtekitError, match="no text"):
        data.read_text(tmp_path / "empty.txt")
    tokens = torch.arange(100)
    w = data.windows(tokens, 30, seed=0)
    assert w.shape == (3, 30) and sorted(w[:, 0].tolist()) == [0, 30, 60]
    assert data.batch(w, 1, 2).shape == (2, 30) and torch.equal(data.batch(w, 1, 2)[1], w[0])  # cycles
    with pytest.raises(PtekitError, match="only 3 windows of 30, 5 are needed"):
        data.windows(tokens, 30, seed=0, at_least=5)


def test_saved_result_is_only_reused_for_the_same_fingerprint(tmp_path):
    from quant import spinquant
    from quant.gptq import quantize_rtn

    s = spinquant.PRESETS["cpu"]
    weights = {"layers.0.attention.wq": quantize_rtn(torch.randn(8, 64))}
    floats = {"norm.weight": torch.ones(64)}
    assert spinquant.load_result(tmp_path, "fp-a") is None  # nothing saved yet
    spinquant.save_result(tmp_path, "fp-a", s, floats, weights, None, None, False, {}, {})
    # Another run's result is an error naming the work directory to delete (the learned rotations are kept
    # elsewhere: shared_rotations).
    with pytest.raises(PtekitError, match=rf"other settings.*delete {re.escape(str(tmp_path))} to start over"):
        spinquant.load_result(tmp_path, "fp-b")
    loaded_floats, loaded_weights = spinquant.load_result(tmp_path, "fp-a")
    assert torch.equal(loaded_weights["layers.0.attention.wq"][0], weights["layers.0.attention.wq"][0])
    # A newer checkpoint beside an older manifest (files from two runs put together) is not used.
    spinquant.save_result(tmp_path, "fp-c", s, floats, weights, None, None, False, {}, {})
    result = tmp_path / spinquant.RESULT
    manifest = json.loads((result / spinquant.MANIFEST).read_text())
    manifest["fingerprint"] = "fp-a"
    (result / spinquant.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PtekitError, match=rf"{spinquant.CHECKPOINT}: saved by a run with other settings"):
        spinquant.load_result(tmp_path, "fp-a")
    manifest["fingerprint"] = "fp-c"
    (result / spinquant.MANIFEST).write_text(json.dumps(manifest))
    before = {f.name: f.read_bytes() for f in result.iterdir()}

    # Ctrl-C while a new result is written (here: at its manifest, after the checkpoint and the
    # rotations): the previous result stays whole and usable, and no staging directory is left.
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_text", interrupted)
        with pytest.raises(KeyboardInterrupt):
            spinquant.save_result(tmp_path, "fp-d", s, floats, weights, torch.eye(64), torch.eye(16)[None], True, {}, {})
    assert {f.name: f.read_bytes() for f in result.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [spinquant.RESULT]
    assert spinquant.load_result(tmp_path, "fp-c") is not None


def test_rotation_training_runs_in_bf16_only_where_the_cpu_multiplies_bf16(tmp_path, monkeypatch):
    """bf16 matmuls by default only on hardware with bf16 instructions; -O bf16 overrides either way."""
    from quant import spinquant

    for native in (True, False):
        monkeypatch.setattr(spinquant, "native_bf16", lambda device, native=native: native)
        assert spinquant.settings_from(MethodInputs(work_dir=tmp_path, device="cpu")).bf16 is native
        for given in ("true", "false"):
            s = spinquant.settings_from(MethodInputs(work_dir=tmp_path, device="cpu", options={"bf16": given}))
            assert s.bf16 is (given == "true")


def test_mixed_gptq_data_is_half_self_generated_and_kept_for_a_rerun(tiny96_hf, calibration, tmp_path, monkeypatch):
    """gptq_data=mixed: GPTQ sees the model's own text in its first half of windows, the calibration text in
    the second; the generated windows stay in ptekit's cache, so a rerun, in this work directory or
    another, does not write them again."""
    from exporter.tokenizer import Tokenizer
    from quant import data, gptq, sft_data, spinquant

    monkeypatch.setenv("PTEKIT_CACHE", str(tmp_path / "cache"))
    ckpt = load_checkpoint(tiny96_hf)
    tok = Tokenizer(ckpt.tokenizer_path)
    seen = []
    real_gptq = gptq.gptq_model

    def recording(model, tokens, *a, **k):
        seen.append(tokens.clone())
        return real_gptq(model, tokens, *a, **k)

    monkeypatch.setattr(spinquant, "gptq_model", recording)
    run = inputs(tmp_path, tok, calibration, rotation="hadamard", gptq_data="mixed")
    spinquant.quantize(build_model(ckpt, max_seq_len=64), run)
    tokens = seen[0]
    s = spinquant.settings_from(run)
    calib = data.windows(data.token_stream(calibration, tok), s.gptq_seq_len, s.seed + 1, at_least=s.gptq_samples)
    assert tokens.shape == (s.gptq_samples, s.gptq_seq_len)
    half = s.gptq_samples // 2
    torch.testing.assert_close(tokens[half:], calib[:half])
    assert not any(torch.equal(row, c) for row in tokens[:half] for c in calib)  # not calibration windows
    assert not list(tmp_path.glob("own-text-*"))  # not in the work directory
    cached = list((tmp_path / "cache" / "own-text").glob("own-text-*.jsonl"))
    assert len(cached) == 1
    assert torch.equal(torch.tensor([e.tokens for e in sft_data.read_examples(cached[0])]), tokens[:half])

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(sft_data, "self_generated", no_generation)
    shutil.rmtree(tmp_path / spinquant.RESULT)
    spinquant.quantize(build_model(ckpt, max_seq_len=64), run)
    assert torch.equal(seen[1], tokens)
    shutil.rmtree(tmp_path / spinquant.RESULT)  # a GPTQ option alone changes: the same text, not written again
    spinquant.quantize(build_model(ckpt, max_seq_len=64), inputs(tmp_path, tok, calibration, rotation="hadamard",
                                                                 gptq_data="mixed", gptq_asymmetric="false"))
    assert torch.equal(seen[2], tokens)
    shutil.rmtree(tmp_path / spinquant.RESULT)  # nor when a rotation training option changes
    spinquant.quantize(build_model(ckpt, max_seq_len=64), inputs(tmp_path, tok, calibration, rotation="hadamard",
                                                                 gptq_data="mixed", lr="0.5"))
    assert torch.equal(seen[3], tokens)
    spinquant.quantize(build_model(ckpt, max_seq_len=64), inputs(tmp_path / "other", tok, calibration,
                                                                 rotation="hadamard", gptq_data="mixed"))
    assert torch.equal(seen[4], tokens)  # another export's work directory: the same text, not written again
    with pytest.raises(PtekitError, match="gptq_data='text'; choose one of calibration, generated, mixed"):
        spinquant.settings_from(inputs(tmp_path, tok, calibration, gptq_data="text"))


def test_spinquant_and_qloras_learned_start_learn_the_rotations_once(tiny96_hf, tmp_path, monkeypatch):
    """On the model's own text qlora's learned start learns on spinquant's windows with spinquant's settings:
    the second of the two reads the rotations the first learned (ptekit's cache) instead of learning them
    again, and starts from the same rotations and GPTQ integers."""
    import dataclasses

    from safetensors.torch import load_file

    from exporter.tokenizer import Tokenizer
    from quant import qlora, sft_data, spinquant
    from quant.method import MethodInputs, weights_hash
    from quant.train import Dist

    monkeypatch.setenv("PTEKIT_CACHE", str(tmp_path / "cache"))
    ckpt = load_checkpoint(tiny96_hf)
    tok = Tokenizer(ckpt.tokenizer_path)
    short = dict(TINY_OPTIONS, gptq_seq_len=32)
    monkeypatch.setitem(spinquant.PRESETS, "cpu", dataclasses.replace(spinquant.PRESETS["cpu"], **short))
    steps = []
    real_advance = spinquant._Run.advance
    monkeypatch.setattr(spinquant._Run, "advance", lambda self, *a: steps.append(1) or real_advance(self, *a))
    spinquant.quantize(build_model(ckpt, max_seq_len=64), MethodInputs(work_dir=tmp_path / "sq", tokenizer=tok, device="cpu"))
    assert len(steps) >= TINY_OPTIONS["iterations"]  # the start probes' steps too
    steps.clear()
    # qlora's side: its training windows of the same text (gen_sequences = gptq_samples, seq_len = 32), then
    # its learned start on them.
    teacher = build_model(ckpt, max_seq_len=64).float()
    run = MethodInputs(work_dir=tmp_path / "ql", tokenizer=tok, device="cpu",
                       options={"gen_sequences": str(short["gptq_samples"]), "seq_len": "32"})
    s = qlora.QLoRASettings.from_inputs(run)
    windows = qlora.training_windows(sft_data.SELF_GENERATED, run, s, 32, teacher, torch.device("cpu"), Dist(),
                                     weights_hash(teacher))
    start = build_model(ckpt, max_seq_len=64).float()
    gptq = spinquant.learned_gptq(start, windows.tokens[:, :32], short["gptq_samples"], seed=0, device="cpu",
                                  progress=False, scale_search=True, asymmetric=True)
    assert steps == []  # read, not learned again
    assert len(list((tmp_path / "cache" / "rotations").glob(f"*/{spinquant.STATE}"))) == 1
    saved = load_file(str(tmp_path / "sq" / spinquant.RESULT / spinquant.CHECKPOINT))
    for name, (q, scale) in gptq.items():
        assert torch.equal(saved[f"{name}.qdata"], q) and torch.equal(saved[f"{name}.scale"], scale), name


def test_mixed_gptq_data_asks_the_calibration_text_only_for_its_half(tiny96_hf, tmp_path):
    """gptq_data=mixed fills half of GPTQ's windows with the model's own text, so a calibration text with
    half the windows is enough; gptq_data=calibration still needs them all, and says so in one line."""
    from exporter.tokenizer import Tokenizer
    from quant import data, spinquant

    ckpt = load_checkpoint(tiny96_hf)
    tok = Tokenizer(ckpt.tokenizer_path)
    words = (SHARED_DATA / "wikitext-2-valid-tokens.txt").read_text(encoding="utf-8-sig").split()
    short = tmp_path / "short.txt"
    n = 40
    while True:  # the fewest words that make 2 windows of 32 tokens (gptq_samples is 4)
        short.write_text(" ".join(words[:n]))
        if len(data.token_stream(short, tok)) // TINY_OPTIONS["gptq_seq_len"] >= 2:
            break
        n += 10
    options = dict(rotation="hadamard")
    spinquant.quantize(build_model(ckpt, max_seq_len=64), inputs(tmp_path / "mixed", tok, short, gptq_data="mixed",
                                                                  **options))
    with pytest.raises(PtekitError, match=r"short\.txt: .* make only [23] windows of 32, 4 are needed"):
        spinquant.quantize(build_model(ckpt, max_seq_len=64),
                           inputs(tmp_path / "calib", tok, short, gptq_data="calibration", **options))


def test_without_a_calibration_file_rotations_and_gptq_learn_on_the_models_own_text(tiny96_hf, tmp_path, monkeypatch):
    """The default: the model writes gptq_samples sequences before any change (the sampler and seed qlora's
    default trains on), the rotations learn on their first train_seq_len tokens and GPTQ calibrates on
    their first gptq_seq_len; no text file is read. GPTQ options that need a file are a clear error."""
    from exporter.tokenizer import Tokenizer
    from quant import data, gptq, sft_data, spinquant

    ckpt = load_checkpoint(tiny96_hf)
    tok = Tokenizer(ckpt.tokenizer_path)
    seen = {}
    real_gptq, real_learn = gptq.gptq_model, spinquant.learn_rotations

    def gptq_recording(model, tokens, *a, **k):
        seen["gptq"] = tokens.clone()
        return real_gptq(model, tokens, *a, **k)

    def learn_recording(model, pool, *a, **k):
        seen["pool"] = pool.clone()
        return real_learn(model, pool, *a, **k)

    monkeypatch.setattr(spinquant, "gptq_model", gptq_recording)
    monkeypatch.setattr(spinquant, "learn_rotations", learn_recording)
    monkeypatch.setattr(data, "default_calibration", lambda: pytest.fail("read a calibration file"))
    run = inputs(tmp_path, tok, None, gptq_seq_len=24)
    spinquant.quantize(build_model(ckpt, max_seq_len=64), run)
    s = spinquant.settings_from(run)
    assert s.gptq_data == "generated"
    expected = torch.tensor([e.tokens for e in sft_data.self_generated(build_model(ckpt, max_seq_len=64).float(), tok,
                                                                      s.gptq_samples, 33, seed=0, progress=False)])
    assert torch.equal(seen["pool"], expected[:, :32])
    assert torch.equal(seen["gptq"], expected[:, :24])
    record = json.loads((tmp_path / spinquant.RESULT / spinquant.MANIFEST).read_text())["calibration"]
    assert record["text"] == "own" and record["path"] is None
    for given in ("mixed", "calibration"):
        with pytest.raises(PtekitError, match=f"gptq_data={given} calibrates GPTQ on a calibration file; pass one"):
            spinquant.settings_from(inputs(tmp_path, tok, None, gptq_data=given))
