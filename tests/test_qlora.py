"""The qlora method: QAT fake-quantizes exactly as the scheme converts, the adapters stay a float
path through lowering, the real export runs end to end, and the training data parses (or fails
with one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import relowered_unfused, relowered_with_every_xnnpack_pass, same_logits
from exporter.checkpoint import Checkpoint, build_model, random_checkpoint
from exporter.config import ModelConfig
from exporter.errors import PtekitError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model(vocab=512, tie=True, seed=0):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=vocab,
                      tie_embeddings=tie, max_seq_len=64)
    return build_model(Checkpoint(cfg, random_checkpoint(cfg, seed=seed), None, [], "meta"))


def fake_quantized_weights(model) -> dict[str, torch.Tensor]:
    """Name -> the weight as the forward pass sees it."""
    from quant.qat import FakeQuantEmbedding, FakeQuantLinear

    with torch.no_grad():
        return {name: m.fake_quantized_weight() for name, m in model.named_modules()
                if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))}


def lora_modules(model) -> dict:
    from quant.lora import LoRALinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameter_count(model) -> int:
    from quant.lora import lora_parameters

    return sum(p.numel() for p in lora_parameters(model))


# --- QAT == the scheme -------------------------------------------------------------------------


@pytest.mark.parametrize("tie,learn_scales", [(True, False), (False, False), (False, True)])
def test_fake_quantization_is_the_converted_quantization(tie, learn_scales):
    """Same integers, same scales, same logits: what training saw is what the device gets, learned
    group scales (fp32 values bf16 cannot hold) included."""
    import copy

    from quant import qat
    from quant.ptq import apply_scheme

    model = small_model(tie=tie)
    with torch.no_grad():  # stand-in for training: weights no longer the checkpoint's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    qat.prepare(model, learn_scales=learn_scales)
    scales = [p for n, p in model.named_parameters() if n.endswith(".scale")]
    assert len(scales) == (2 * 7 if learn_scales else 0)
    assert {id(p) for p in qat.learned_scales(model)} == {id(p) for p in scales}  # what the DPO round leaves out
    with torch.no_grad():  # stand-in for training the scales
        for p in scales:
            p.mul_(1 + 0.05 * torch.randn_like(p))
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        fake_logits = model(tokens)
    fake = fake_quantized_weights(model)
    assert len(fake) == 2 * 7 + 2  # every block linear, the classifier, the embedding

    converted = copy.deepcopy(model)
    converted = apply_scheme(converted, qat.convert(converted))
    for name, w in fake.items():
        mod = converted.get_submodule(name)
        if name == "tok_embeddings":
            scale, ints = mod.scales, mod.weight
            assert torch.equal(torch.round(w / scale[:, None]).to(torch.int8), ints)
            assert torch.equal(mod.dequantized(), w)
            continue
        t = mod.weight
        assert type(t).__name__ == "IntxUnpackedToInt8Tensor", name
        group = t.qdata.shape[1] // t.scale.shape[1]
        ints = torch.round(w.reshape(*t.scale.shape, group) / t.scale[..., None]).reshape(t.qdata.shape)
        assert torch.equal(ints.to(torch.int8), t.qdata), name
        assert torch.equal(t.dequantize(), w), name
    with torch.no_grad():
        assert torch.equal(converted(tokens), fake_logits)


def test_adapters_wrap_block_linears_and_the_scheme_skips_them():
    from quant import lora, scheme
    from quant.ptq import apply_scheme

    model = small_model()
    lora.add_lora(model, rank=4, scale=2.0)
    names = sorted(scheme.block_linears(model))
    assert len(names) == 2 * 7 and all(n.endswith(".base") for n in names)
    assert "layers.0.attention.wq.base" in names
    assert lora_parameter_count(model) == 2 * 4 * (4 * 64 + 2 * 64 + 2 * 32 + 3 * (64 + 128))
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        before = model(tokens)
        apply_scheme(model)
        assert torch.equal(before, small_model()(tokens))  # B starts at zero: the base model, unchanged
    wq = model.layers[0].attention.wq
    assert type(wq.base.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(wq.lora_a.weight) is torch.nn.Parameter and wq.lora_a.weight.dtype == torch.float32


# --- the real export ---------------------------------------------------------------------------

EXPORT_OPTIONS = dict(qat_steps=2, lora_steps=2, seq_len=64, micro_batch=2, grad_accum=1, warmup_steps=0,
                      lora_lr=0.05, progress=False)  # a large adapter lr so the branch is far from zero


@pytest.fixture(scope="module")
def qlora_export(tiny_hf, wikitext_valid, tmp_path_factory):
    from exporter.pipeline import export

    out = tmp_path_factory.mktemp("qlora")
    return export(tiny_hf, out, "qlora", max_seq_len=256, calibration=wikitext_valid, options=EXPORT_OPTIONS)


def test_pte_logits_match_eager_converted_model_with_float_adapters(qlora_export, tiny_hf, tiny_ptq_pte,
                                                                    wikitext_valid, monkeypatch):
    import quant.qlora as qlora
    from exporter.checkpoint import load_checkpoint
    from exporter.runtime import PteModel
    from quant.method import MethodInputs

    out = qlora_export.out_dir
    assert qlora_export.manifest["method"] == "qlora"
    meta = json.loads((out / "qlora-work" / "trained" / "qlora.json").read_text())
    assert meta["lora"] == {"rank": 16, "scale": 2.0}

    # Lowering can be rerun from the saved weights: the same inputs rebuild the model, no training.
    monkeypatch.setattr(qlora, "train", lambda *a, **k: pytest.fail("trained again instead of loading"))
    inputs = MethodInputs(work_dir=out / "qlora-work", calibration=wikitext_valid, options=EXPORT_OPTIONS)
    eager = qlora.quantize(build_model(load_checkpoint(tiny_hf), max_seq_len=256), inputs).eval()

    tokens = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = eager(tokens)[0]
        for m in lora_modules(eager).values():
            m.lora_b.weight.zero_()
        without_adapters = eager(tokens)[0]
    pte = PteModel(qlora_export.pte)
    # forward returns the last position's logits (what the phone samples from): one prefill per length.
    lengths = [1, 7, 16, 31, 48]
    got = torch.stack([pte.forward(tokens[0, :n].tolist(), 0) for n in lengths])
    want = want[[n - 1 for n in lengths]]
    without_adapters = without_adapters[[n - 1 for n in lengths]]
    span = (want.max() - want.min()).item()
    err = (got - want).abs().max().item()
    assert err < 0.02 * span
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.8
    # The adapters change the logits by far more than the .pte's error: the .pte computes them.
    assert (without_adapters - want).abs().max().item() > 5 * err

    # They are stored as fp32, 4 bytes a weight (8da4w would take about 0.6), beside the same model's
    # ptq export (which also holds the few KB of forward_all_logits).
    n_lora = lora_parameter_count(eager)
    grown = qlora_export.pte.stat().st_size - tiny_ptq_pte.stat().st_size
    assert 4 * n_lora - 16 * 1024 <= grown < 4 * n_lora + 64 * 1024, (grown, n_lora)



def test_xnnpack_passes_left_out_change_no_byte_of_the_qlora_pte(qlora_export, tiny_hf, wikitext_valid, tmp_path,
                                                                  monkeypatch):
    """The fp32 adapter branches beside the 4-bit linears lower to the same bytes without those passes; the
    re-export lowers the weights saved in the work directory, the first export the trained model in memory."""
    every = relowered_with_every_xnnpack_pass(qlora_export.out_dir, tiny_hf, "qlora", tmp_path, monkeypatch,
                                              max_seq_len=256, calibration=wikitext_valid, options=EXPORT_OPTIONS)
    assert every == qlora_export.pte.read_bytes()


def test_fusing_keeps_the_eager_model_exact():
    from quant import lora
    from quant.fuse import fuse_qkv
    from quant.ptq import apply_scheme

    model = lora.fold_scales(apply_scheme(lora.add_lora(small_model())))
    for p in lora.lora_parameters(model):
        torch.nn.init.normal_(p, std=0.05)  # B starts at zero: give the branches something to add
    model.layers[1].attention.wk.base = torch.nn.Linear(64, 32, bias=False)  # a float base among 4-bit ones
    tokens = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        before = model(tokens)
        fuse_qkv(model)
        after = model(tokens)
    assert torch.equal(before, after)
    assert isinstance(model.layers[0].attention.wqkv, lora.LoRALinear) and not hasattr(model.layers[0].attention, "wq")
    assert model.layers[1].attention.wqkv is None  # left as it was


def test_fused_linears_with_adapters_are_exact(qlora_export, tiny_hf, wikitext_valid, tmp_path, monkeypatch):
    """Fused wq/wk/wv keep their adapters: the down-projections stacked, the up-projections block-diagonal."""
    unfused = relowered_unfused(qlora_export.out_dir, tiny_hf, "qlora", tmp_path, monkeypatch, max_seq_len=256,
                                calibration=wikitext_valid, options=EXPORT_OPTIONS)
    assert unfused.read_bytes() != qlora_export.pte.read_bytes()
    same_logits(qlora_export.pte, unfused)


def test_qat_steps_0_trains_only_the_adapters_on_the_round_to_nearest_backbone(tiny_hf, wikitext_valid, tmp_path):
    import quant.qlora as qlora
    from exporter.checkpoint import load_checkpoint
    from exporter.tokenizer import Tokenizer
    from quant.method import MethodInputs
    from quant.ptq import apply_scheme

    ckpt = load_checkpoint(tiny_hf)
    inputs = MethodInputs(work_dir=tmp_path, tokenizer=Tokenizer(ckpt.tokenizer_path), calibration=wikitext_valid,
                          options={**EXPORT_OPTIONS, "qat_steps": 0, "lora_steps": 1, "rotation": "none"})
    got = qlora.quantize(build_model(ckpt, max_seq_len=256), inputs)
    rtn = apply_scheme(build_model(ckpt, max_seq_len=256))
    assert not (tmp_path / "qat" / "state.pt").exists() and (tmp_path / "lora" / "state.pt").exists()
    for name, m in lora_modules(got).items():
        want = rtn.get_submodule(name).weight
        assert torch.equal(m.base.weight.qdata, want.qdata) and torch.equal(m.base.weight.scale, want.scale), name
        assert m.lora_b.weight.abs().max() > 0, name  # the one LoRA step moved B off its zero start
    with pytest.raises(PtekitError, match="train nothing"):
        qlora.QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, options={"qat_steps": 0, "lora_steps": 0}))


# --- data --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(smollm2_hf):
    from exporter.tokenizer import Tokenizer

    return Tokenizer(smollm2_hf / "tokenizer.json")


def targets_text(tok, ex) -> str:
    return tok.decode([t for t, m in zip(ex.tokens, ex.mask) if m])


def test_chat_jsonl_trains_on_assistant_turns_only(tok, tmp_path):
    from quant.sft_data import load_examples

    f = tmp_path / "chat.jsonl"
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
                         {"role": "assistant", "content": "Rome."}]}
    f.write_text(json.dumps(conv) + "\n\n" + json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    chat, pr = load_examples(f, tok)
    assert targets_text(tok, chat) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    assert tok.decode(chat.tokens).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital")
    assert targets_text(tok, pr) == "4<|im_end|>\n"
    assert "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n" in tok.decode(pr.tokens)


def test_plain_text_trains_on_every_token_and_packs_into_windows(tok, tmp_path):
    from quant.sft_data import load_examples, pack

    f = tmp_path / "text.txt"
    f.write_text("\ufeff" + "The quick brown fox jumps over the lazy dog. " * 40)
    [ex] = load_examples(f, tok)
    assert all(ex.mask) and tok.decode(ex.tokens).startswith("The quick")
    w = pack([ex], 16, str(f))
    assert w.tokens.shape == (w.tokens.shape[0], 17) and len(w) == (len(ex.tokens) - 1) // 16
    assert w.tokens[0, -1] == w.tokens[1, 0] == ex.tokens[16]  # windows overlap by the shifted target


def test_text_jsonl_trains_on_every_token_of_the_text_the_other_readers_see(tok, tmp_path):
    """{"text": ...} lines and JSON strings, the JSONL that calibration and evaluation read
    (quant.data), are documents to train on: every token a target."""
    from quant import data
    from quant.sft_data import load_examples

    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "The quick brown fox."}) + "\n\n" + json.dumps("Jumps over the lazy dog.") + "\n")
    docs = load_examples(f, tok)
    assert [tok.decode(d.tokens) for d in docs] == ["The quick brown fox.", "Jumps over the lazy dog."]
    assert all(all(d.mask) for d in docs)
    assert data.read_text(f) == "The quick brown fox.\n\nJumps over the lazy dog."


def test_qlora_trains_on_a_text_jsonl_file(tiny_hf, wikitext_valid, tmp_path):
    """`--data docs.jsonl` with {"text": ...} lines, as `ptekit export --method qlora --data` passes it."""
    import quant.qlora as qlora
    from exporter.checkpoint import load_checkpoint
    from exporter.tokenizer import Tokenizer
    from quant.method import MethodInputs

    paragraphs = [p for p in wikitext_valid.read_text(encoding="utf-8-sig").split("\n\n") if p.strip()][:200]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    ckpt = load_checkpoint(tiny_hf)
    inputs = MethodInputs(work_dir=tmp_path / "work", tokenizer=Tokenizer(ckpt.tokenizer_path), calibration=docs,
                          options={**EXPORT_OPTIONS, "qat_steps": 0, "lora_steps": 1, "rotation": "none"})
    got = qlora.quantize(build_model(ckpt, max_seq_len=256), inputs)
    assert (tmp_path / "work" / "lora" / "state.pt").exists()
    assert all(m.lora_b.weight.abs().max() > 0 for m in lora_modules(got).values())


def test_preference_pairs_share_the_prompt(tok, tmp_path):
    from quant.sft_data import load_preferences

    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n")
    [p] = load_preferences(f, tok)
    assert tok.decode(p.prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(p.chosen) == "Hello!<|im_end|>\n" and tok.decode(p.rejected) == "Go away.<|im_end|>\n"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "a.jsonl:1: no assistant message"),
        ("b.jsonl", '{"prompt": "x", "response": "y"}\n{"prompt": "x", \n', "b.jsonl:2: not valid JSON"),
        ("c.jsonl", '{"title": "hello"}\n', "c.jsonl:1: unknown record with keys ['title']"),
        ("d.jsonl", '{"messages": [{"role": "user"}]}\n', "d.jsonl:1: every message needs a string"),
        ("e.jsonl", '[1, 2]\n', "e.jsonl:1: expected a JSON object"),
        ("f.txt", "   \n\n", "f.txt: the file is empty"),
        ("g.txt", b"\xff\xfe\x00bad", "g.txt: not UTF-8 text"),
        ("h.txt", "too short", "fewer than one training window"),
    ],
)
def test_bad_data_is_one_clear_error(tok, tmp_path, name, content, message):
    from quant.sft_data import load_examples, pack

    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PtekitError) as e:
        pack(load_examples(f, tok), 64, str(f))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_data_is_one_line(tiny_hf, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\nnot json\n')
    r = subprocess.run([sys.executable, "-m", "exporter.cli", "export", str(tiny_hf), "-o", str(tmp_path / "o"),
                        "--method", "qlora", "--data", str(bad)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "bad.jsonl:2: not valid JSON" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_option_is_one_clear_error(tmp_path):
    from quant.method import MethodInputs
    from quant.qlora import QLoRASettings

    with pytest.raises(PtekitError, match="unknown option 'rnak'"):
        QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, options={"rnak": 8}))
    with pytest.raises(PtekitError, match="scale_lr must be 0"):
        QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, options={"scale_lr": "-1e-5"}))
    s = QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, steps=7, options={"rank": "8", "autocast": "false"}))
    assert (s.rank, s.autocast, s.qat_steps, s.lora_steps) == (8, False, 7, 7)


def test_the_preset_follows_the_device_and_options_override_it(tmp_path):
    from quant.method import MethodInputs
    from quant.qlora import QLoRASettings

    cpu = QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, device="cpu"))
    gpu = QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, device="cuda"))
    assert (cpu.qat_steps, cpu.lora_steps, cpu.lora_lr) == (50, 20, 1e-4)
    assert (gpu.qat_steps, gpu.lora_steps, gpu.lora_lr) == (400, 100, 2e-4)
    paper_on_cpu = QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, device="cpu",
                                                          options={"preset": "paper", "lora_steps": "3"}))
    assert (paper_on_cpu.qat_steps, paper_on_cpu.lora_steps) == (400, 3)
    with pytest.raises(PtekitError, match="unknown preset 'fast'"):
        QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, options={"preset": "fast"}))


# --- data-free and DPO -------------------------------------------------------------------------


def test_self_generated_data_is_the_models_own_text():
    from quant.sft_data import self_generated

    model = small_model()
    a = self_generated(model, None, n_sequences=3, length=20, seed=1, batch=2, progress=False)
    b = self_generated(model, None, n_sequences=3, length=20, seed=1, batch=2, progress=False)
    assert [e.tokens for e in a] == [e.tokens for e in b] and all(len(e.tokens) == 20 for e in a)
    assert all(layer.attention.k_cache is None for layer in model.layers)
    # The greedy tokens after the random first one are the model's own argmax continuation.
    seq = torch.tensor([a[0].tokens[:2]])
    with torch.no_grad():
        assert int(model(seq[:, :1])[0, -1].argmax()) == a[0].tokens[1]


def test_own_text_is_written_once_per_weights_count_length_and_seed(tmp_path, monkeypatch):
    """spinquant and qlora keep the model's own text through sft_data.own_text: a second call with the
    same weights hash, count, length and seed reads the file instead of generating; any of them changed
    writes another."""
    from quant import sft_data

    model, calls = small_model(), []
    real = sft_data.self_generated

    def counting(*a, **k):
        calls.append(a[2:4])
        return real(*a, **k)

    monkeypatch.setattr(sft_data, "self_generated", counting)
    first = sft_data.own_text(model, None, 3, 20, 1, tmp_path, "w0", progress=False)
    again = sft_data.own_text(model, None, 3, 20, 1, tmp_path, "w0", progress=False)
    assert [e.tokens for e in again] == [e.tokens for e in first] and len(calls) == 1
    for other in ((3, 20, 2, "w0"), (3, 20, 1, "w1"), (2, 20, 1, "w0"), (3, 21, 1, "w0")):
        n, length, seed, weights = other
        sft_data.own_text(model, None, n, length, seed, tmp_path, weights, progress=False)
    assert len(calls) == 5 and len(list(tmp_path.glob("own-text-*.jsonl"))) == 5


def test_two_runs_that_need_the_same_own_text_at_once_write_it_once(tmp_path, monkeypatch):
    """spinquant and qlora exports started together (or a test run's workers) share the text: the second
    waits on the first one's lock and reads what it wrote."""
    import threading
    import time

    from quant import sft_data

    model, calls = small_model(), []
    real = sft_data.self_generated

    def slow(*a, **k):
        calls.append(a[2])
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        return real(*a, **k)

    monkeypatch.setattr(sft_data, "self_generated", slow)
    results = [None, None]

    def run(i):
        results[i] = sft_data.own_text(model, None, 3, 20, 1, tmp_path, "w0", progress=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [3]
    assert [e.tokens for e in results[0]] == [e.tokens for e in results[1]]


def test_own_text_continues_from_the_batches_an_interrupted_or_shorter_run_kept(tmp_path, monkeypatch):
    """An interrupted run, or one that asked for fewer sequences, leaves its finished batches: a later call
    writes only the sequences after them, and its text is the text of one uninterrupted call."""
    from quant import sft_data

    monkeypatch.setattr(sft_data, "GEN_BATCH", 2)
    model, calls = small_model(), []
    whole = sft_data.self_generated(model, None, 5, 20, seed=1, batch=2, progress=False)
    real = sft_data.self_generated

    def interrupted_after_one_batch(*a, on_batch=None, **k):
        def once(examples, state):
            on_batch(examples, state)
            raise KeyboardInterrupt

        return real(*a, on_batch=once, **k)

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(sft_data, "self_generated", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        sft_data.own_text(model, None, 5, 20, 1, tmp_path, "w0", progress=False)
    assert not list(tmp_path.glob("own-text-*.jsonl"))
    monkeypatch.setattr(sft_data, "self_generated", counting)
    resumed = sft_data.own_text(model, None, 5, 20, 1, tmp_path, "w0", progress=False)
    assert [e.tokens for e in resumed] == [e.tokens for e in whole] and calls == [3]
    # Asked for fewer first (3: one whole batch and one more sequence), then for all 5.
    other = tmp_path / "other"
    other.mkdir()
    fewer = sft_data.own_text(model, None, 3, 20, 1, other, "w0", progress=False)
    assert [e.tokens for e in fewer] == [e.tokens for e in sft_data.self_generated(
        model, None, 3, 20, seed=1, batch=2, progress=False)]
    calls.clear()
    more = sft_data.own_text(model, None, 5, 20, 1, other, "w0", progress=False)
    assert [e.tokens for e in more] == [e.tokens for e in whole] and calls == [3]


def test_own_text_is_one_window_a_sequence_and_the_start_sees_spinquants_windows(tmp_path, monkeypatch):
    """Without --data qlora trains on one window per self-written sequence (none joins two sequences), so its
    learned start's rotations and GPTQ see exactly the windows spinquant learns on when spinquant writes the
    text itself: each sequence's first seq_len tokens."""
    import shutil

    from quant import qlora, sft_data, spinquant
    from quant.method import MethodInputs, weights_hash
    from quant.train import Dist

    monkeypatch.setenv("PTEKIT_CACHE", str(tmp_path / "cache"))
    model = small_model().float()
    run = MethodInputs(work_dir=tmp_path, options={"gen_sequences": "5", "seq_len": "24"})
    s = qlora.QLoRASettings.from_inputs(run)
    windows = qlora.training_windows(sft_data.SELF_GENERATED, run, s, 24, model, torch.device("cpu"), Dist(),
                                     weights_hash(model))
    written = sft_data.self_generated(model, None, 5, 25, seed=0, progress=False)
    assert torch.equal(windows.tokens, torch.tensor([e.tokens for e in written])) and bool(windows.mask.all())
    shutil.rmtree(tmp_path / "cache")  # spinquant writes the text again itself
    sq = spinquant.Settings(rotation="learned", gptq_samples=5, train_seq_len=24, gptq_seq_len=24)
    pool, tokens = spinquant.text_windows(model, None, sq, None, weights_hash(model))
    assert torch.equal(pool, windows.tokens[:, :24]) and torch.equal(tokens, windows.tokens[:, :24])


def test_mixed_text_alternates_the_models_own_windows_with_the_calibration_texts(tok, wikitext_valid, tmp_path):
    """train_text=mixed: each generated window followed by a window of WikiText-2's validation text, every
    position a distillation target, and its own fingerprint (the saved rounds of the other are not reused)."""
    from quant import data, sft_data
    from quant.method import MethodInputs
    from quant.qlora import QLoRASettings, _with_calibration_text, data_id

    generated = sft_data.Windows(torch.randint(0, 1000, (3, 65)), torch.ones(3, 65, dtype=torch.bool))
    mixed = _with_calibration_text(generated, MethodInputs(work_dir=tmp_path, tokenizer=tok))
    assert mixed.tokens.shape == (6, 65) and bool(mixed.mask.all())
    assert torch.equal(mixed.tokens[0::2], generated.tokens)
    stream = data.token_stream(wikitext_valid, tok)
    windows = stream[: len(stream) // 65 * 65].view(-1, 65)
    assert all(bool((windows == row).all(1).any()) for row in mixed.tokens[1::2])
    options = [QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, options=o))
               for o in ({}, {"train_text": "mixed"})]
    assert data_id(sft_data.SELF_GENERATED, options[0], 0) != data_id(sft_data.SELF_GENERATED, options[1], 0)
    with pytest.raises(PtekitError, match="train_text='wiki'; choose generated or mixed"):
        QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, options={"train_text": "wiki"}))
    from quant.qlora import quantize

    with pytest.raises(PtekitError, match="train_text=mixed .* --data .*corpus.txt replaces both"):
        quantize(small_model(), MethodInputs(work_dir=tmp_path, calibration=tmp_path / "corpus.txt",
                                             options={"train_text": "mixed"}))


def test_saved_work_of_another_run_is_an_error_naming_the_work_directory(tmp_path):
    """One resume policy (quant.method): a round's state or the trained result saved under another
    fingerprint is neither used nor overwritten; the run stops, saying what to delete."""
    import re

    from quant import qat, qlora
    from quant.sft_data import Windows
    from quant.train import Dist, TrainConfig, sft_objective, train

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (4, 17), generator=g)
    windows = Windows(tokens, torch.ones_like(tokens, dtype=torch.bool))
    cfg = TrainConfig(steps=1, lr=1e-3, warmup_steps=0, micro_batch=2, grad_accum=1, checkpoint_every=0)
    work = tmp_path / "qlora-work"
    model = small_model()
    objective = sft_objective(windows, cfg, Dist(), torch.device("cpu"), None)
    state = work / "qat" / "state.pt"
    train("qat", model, list(model.parameters()), objective, cfg, state, "fp-a", torch.device("cpu"), Dist(),
          progress=False, work_dir=work)
    saved = state.read_bytes()
    start_over = rf"delete {re.escape(str(work))} to start over, or give the run another work directory"
    with pytest.raises(PtekitError, match=rf"{re.escape(str(state))}: saved by a run with other settings.*{start_over}"):
        train("qat", model, list(model.parameters()), objective, cfg, state, "fp-b", torch.device("cpu"), Dist(),
              progress=False, work_dir=work)
    assert state.read_bytes() == saved

    trained = work / qlora.TRAINED
    assert not qlora.load_trained(trained, small_model(), "fp-a", work)  # nothing saved yet
    qat.prepare(model)  # what the result holds: the model still fake-quantized
    qlora.save_trained(trained, model, {"fingerprint": "fp-a", "lora": None, "rotation": "none"})
    with pytest.raises(PtekitError, match=rf"{start_over}.*delete only {re.escape(str(trained))}") as e:
        qlora.load_trained(trained, small_model(), "fp-b", work)
    assert "\n" not in str(e.value)
    assert qlora.load_trained(trained, small_model(), "fp-a", work)


def test_dpo_prefers_the_chosen_answers():
    from quant import dpo
    from quant.sft_data import PreferencePair
    from quant.train import Dist, TrainConfig, train

    model = small_model()
    g = torch.Generator().manual_seed(0)
    pairs = [PreferencePair(torch.randint(0, 512, (6,), generator=g).tolist(),
                            torch.randint(0, 512, (4,), generator=g).tolist(),
                            torch.randint(0, 512, (5,), generator=g).tolist()) for _ in range(4)]
    reference = small_model()
    cfg = TrainConfig(steps=6, lr=1e-3, warmup_steps=0, micro_batch=4, grad_accum=1, checkpoint_every=0)
    objective = dpo.objective(pairs, reference, cfg, Dist(), torch.device("cpu"), beta=0.1, max_len=32)
    with torch.no_grad():
        first, parts, _ = objective(model, 0, 0)
    assert first.item() == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        train("dpo", model, list(model.parameters()), objective, cfg, Path(d) / "state.pt", "x",
              torch.device("cpu"), Dist(), progress=False)
    with torch.no_grad():
        last, parts, _ = objective(model, 0, 0)
    assert last.item() < 0.5 and parts["acc"].item() == 1.0


def test_dpo_round_trains_backbone_and_adapters_and_keeps_the_learned_scales(tiny_hf, wikitext_valid, tmp_path):
    """dpo_data: a third round after QAT (scales learned) and LoRA, on the backbone and the adapters; the
    group scales stay where QAT left them, and a rerun loads the trained result."""
    from safetensors.torch import load_file

    import quant.qlora as qlora
    from exporter.checkpoint import load_checkpoint
    from exporter.tokenizer import Tokenizer
    from quant.method import MethodInputs

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."}) + "\n"
                             for i in range(4)))
    ckpt = load_checkpoint(tiny_hf)
    inputs = MethodInputs(work_dir=tmp_path / "work", tokenizer=Tokenizer(ckpt.tokenizer_path),
                          calibration=wikitext_valid,
                          options={**EXPORT_OPTIONS, "qat_steps": 1, "lora_steps": 1, "rotation": "none",
                                   "scale_lr": 1e-3, "dpo_data": str(prefs), "dpo_steps": 1, "dpo_lr": 1e-2})
    tokens = torch.randint(0, ckpt.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    trained = qlora.quantize(build_model(ckpt, max_seq_len=256), inputs)
    states = {r: torch.load(tmp_path / "work" / r / "state.pt", weights_only=True)["params"] for r in ("qat", "dpo")}
    scales = [n for n in states["qat"] if n.endswith(".scale")]
    assert scales and not any(n.endswith(".scale") for n in states["dpo"])
    assert any("lora_b" in n for n in states["dpo"]) and any(n.endswith("w2.base.weight") for n in states["dpo"])
    saved = load_file(tmp_path / "work" / qlora.TRAINED / "model.safetensors")
    assert all(torch.equal(saved[n.replace(".scale", ".base.scale")], states["qat"][n]) for n in scales)  # inside LoRA
    reloaded = qlora.quantize(build_model(ckpt, max_seq_len=256), inputs)
    with torch.no_grad():
        assert torch.equal(trained(tokens), reloaded(tokens))


# --- the quality bar (needs a GPU: about 40 tokens/s of training on 2 CPU cores) -----------------


@pytest.mark.slow
def test_smollm2_qlora_recovers_90_percent_of_the_ptq_gap(smollm2_hf, wikitext_valid, wikitext_test, tmp_path):
    """The issue's bar, eagerly on the first 32K test tokens: (PPL_ptq - PPL_qlora) / (PPL_ptq - PPL_bf16) >= 0.9,
    with the default recipe (400 QAT + 100 LoRA steps of 8 x 512 tokens) trained on the validation text."""
    import math

    import quant.bf16
    from exporter.checkpoint import load_checkpoint
    from exporter.tokenizer import Tokenizer
    from quant.method import MethodInputs
    from quant.ptq import apply_scheme
    from quant.qlora import quantize

    if not torch.cuda.is_available():
        pytest.skip("the default recipe is 2M training tokens: it needs a CUDA device")
    ckpt = load_checkpoint(smollm2_hf)
    tok = Tokenizer(ckpt.tokenizer_path)
    ids = tok.encode(wikitext_test.read_text(encoding="utf-8"))[: 64 * 512]
    windows = torch.tensor(ids).view(-1, 512)

    def ppl(model):
        model = model.to("cuda").eval()
        nll = []
        with torch.no_grad():
            for w in windows.split(8):
                w = w.to("cuda")
                logits = model(w[:, :-1]).float()
                nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").mean(1))
        return math.exp(torch.cat(nll).mean().item())

    bf16 = ppl(quant.bf16.quantize(build_model(ckpt, max_seq_len=512)))  # what `--method bf16` ships
    ptq = ppl(apply_scheme(build_model(ckpt, max_seq_len=512)))
    inputs = MethodInputs(work_dir=tmp_path / "work", tokenizer=tok, calibration=wikitext_valid, device="cuda")
    qlora = ppl(quantize(build_model(ckpt, max_seq_len=512), inputs))
    recovered = (ptq - qlora) / (ptq - bf16)
    print(f"PPL bf16 {bf16:.3f} ptq {ptq:.3f} qlora {qlora:.3f}: recovered {recovered:.1%} of the gap")
    assert recovered >= 0.9


# --- the objective and the start ---------------------------------------------------------------


def test_without_data_it_distills_on_the_models_own_text_and_with_data_it_fine_tunes(tmp_path):
    """No --data: KL to the BF16 model only, on self-generated text (recovery on no particular
    domain). --data FILE: cross-entropy on the file's targets as well (fine-tuning)."""
    from quant import sft_data
    from quant.method import MethodInputs
    from quant.qlora import QLoRASettings, data_source

    bare = MethodInputs(work_dir=tmp_path)
    assert data_source(bare) == sft_data.SELF_GENERATED
    s = QLoRASettings.from_inputs(bare)
    kd_only = s.round_config("qat", 0, user_data=False)
    assert (kd_only.ce_weight, kd_only.kd_weight) == (0.0, 1.0)
    tuned = s.round_config("qat", 0, user_data=True)
    assert (tuned.ce_weight, tuned.kd_weight) == (1.0, 1.0)
    forced = QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, options={"ce_weight": "0"}))
    assert forced.round_config("lora", 0, user_data=True).ce_weight == 0.0
    with pytest.raises(PtekitError, match="rotation='random'; choose none, hadamard or learned"):
        QLoRASettings.from_inputs(MethodInputs(work_dir=tmp_path, options={"rotation": "random"}))


def _short_rotation_preset(monkeypatch):
    import dataclasses

    from quant import spinquant

    monkeypatch.setitem(spinquant.PRESETS, "cpu", dataclasses.replace(
        spinquant.PRESETS["cpu"], iterations=3, train_batch=2, init_probe=1))


def test_learned_start_learns_rotations_on_the_windows_and_a_rerun_rebuilds_the_same_start(tmp_path, monkeypatch):
    """rotation=learned: R1/R2 learned by spinquant's Cayley SGD on the given windows and saved, then
    GPTQ. A second call finds the finished optimization and rebuilds the very same start (what a
    resumed qlora run needs); other windows learn rotations of their own."""
    import copy

    from quant import spinquant

    _short_rotation_preset(monkeypatch)
    monkeypatch.setenv("PTEKIT_CACHE", str(tmp_path / "cache"))
    model = small_model(vocab=512)
    tokens = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    first, again, hadamard = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    learned = spinquant.learned_gptq(first, tokens, 4, seed=0, progress=False)
    states = lambda: list((tmp_path / "cache" / "rotations").glob(f"*/{spinquant.STATE}"))  # noqa: E731
    assert len(states()) == 1
    random = spinquant.hadamard_gptq(hadamard, tokens[:4], seed=0, progress=False)
    assert learned.keys() == random.keys()
    assert any(not torch.equal(learned[n][0], random[n][0]) for n in learned)  # the rotations moved
    rebuilt = spinquant.learned_gptq(again, tokens, 4, seed=0, progress=False)
    for name, (q, scale) in learned.items():
        assert torch.equal(rebuilt[name][0], q) and torch.equal(rebuilt[name][1], scale), name
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(states()) == 1
    spinquant.learned_gptq(copy.deepcopy(model), tokens.flip(0), 4, seed=0, progress=False)
    assert len(states()) == 2


def test_qlora_from_learned_rotations_saves_a_model_that_loads_as_trained(tiny_hf, wikitext_valid, tmp_path,
                                                                          monkeypatch):
    import quant.qlora as qlora
    from exporter.checkpoint import load_checkpoint
    from exporter.tokenizer import Tokenizer
    from quant.method import MethodInputs

    _short_rotation_preset(monkeypatch)
    monkeypatch.setenv("PTEKIT_CACHE", str(tmp_path / "cache"))
    ckpt = load_checkpoint(tiny_hf)
    inputs = MethodInputs(work_dir=tmp_path / "work", tokenizer=Tokenizer(ckpt.tokenizer_path), calibration=wikitext_valid,
                          options={**EXPORT_OPTIONS, "qat_steps": 1, "lora_steps": 0, "rotation": "learned",
                                   "gptq_samples": 4})
    tokens = torch.randint(0, ckpt.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    trained = qlora.quantize(build_model(ckpt, max_seq_len=256), inputs)
    assert list((tmp_path / "cache" / "rotations").glob("*/rotation_state.pt"))
    reloaded = qlora.quantize(build_model(ckpt, max_seq_len=256), inputs)  # from work_dir/trained
    with torch.no_grad():
        assert torch.equal(trained(tokens), reloaded(tokens))


@pytest.mark.parametrize("learn_scales", [False, True])
def test_rotated_start_trains_on_gptqs_grid_and_the_device_gets_what_training_saw(learn_scales):
    """rotation=hadamard: QAT starts on GPTQ's scales, so before any step the fake-quantized weights are
    GPTQ's own integers (recomputed max-based scales would move them), and after a step (which moves
    the scales too when they learn) the converted model still computes exactly what the fake-quantized
    one did."""
    import copy

    from quant import qat
    from quant.ptq import apply_scheme
    from quant.spinquant import hadamard_gptq

    model = small_model(vocab=512)
    tokens = torch.randint(0, 512, (8, 32))
    gptq = hadamard_gptq(model, tokens, seed=0, progress=False)
    qat.prepare(model, {n: s for n, (_, s) in gptq.items()}, learn_scales=learn_scales)
    for name, (q, scale) in gptq.items():
        ints, s = model.get_submodule(name).int4()
        assert torch.equal(ints, q) and torch.equal(s, scale.float()), name
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(tokens).logsumexp(-1).mean().backward()
    opt.step()
    moved = [not torch.equal(model.get_submodule(n).scale, s.float()) for n, (_, s) in gptq.items()]
    assert all(moved) if learn_scales else not any(moved)
    with torch.no_grad():
        fake = model(tokens)
    converted = copy.deepcopy(model)
    converted = apply_scheme(converted, qat.convert(converted))
    with torch.no_grad():
        assert torch.equal(converted(tokens), fake)


def test_group_scales_train_at_their_own_rate(tmp_path):
    """scale_lr: the learned group scales are an optimizer group of their own. With the weights' rate at
    0 the weights stay put and the scales move, and the state records them for a resumed run."""
    from quant import qat
    from quant.train import Dist, TrainConfig, train

    model = small_model(vocab=512)
    qat.prepare(model, learn_scales=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 512, (2, 32))

    def objective(fwd, step, a):
        return fwd(tokens).logsumexp(-1).mean(), {}, tokens.numel()

    cfg = TrainConfig(steps=2, lr=0.0, scale_lr=1e-3, warmup_steps=0, micro_batch=1, grad_accum=1,
                      recompute_activations=False)
    train("t", model, list(model.parameters()), objective, cfg, tmp_path / "state.pt", "fp",
          torch.device("cpu"), Dist(), progress=False, step_sizes=qat.learned_scales(model))
    after = dict(model.named_parameters())
    scales = [n for n in before if n.endswith(".scale")]
    assert len(scales) == 2 * 7
    assert all(not torch.equal(after[n], before[n]) for n in scales)
    assert all(torch.equal(after[n], before[n]) for n in before if n not in scales)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)["params"]
    assert all(torch.equal(saved[n], after[n].detach()) for n in scales)
    assert cfg.fingerprint() != TrainConfig(steps=2, lr=0.0, warmup_steps=0, micro_batch=1, grad_accum=1,
                                            recompute_activations=False).fingerprint()


@pytest.mark.parametrize("native", [False, True])
def test_training_runs_under_bf16_autocast_where_the_device_multiplies_bf16(tmp_path, monkeypatch, native):
    """autocast=None follows quant.method.native_bf16 (the rule spinquant's rotation training uses); an
    explicit false keeps the fingerprint runs had when None meant fp32 on a CPU, true does not."""
    from quant import train as train_module
    from quant.train import Dist, TrainConfig, train

    monkeypatch.setattr(train_module, "native_bf16", lambda device: native)
    model = small_model(vocab=512)
    tokens = torch.randint(0, 512, (2, 32))
    seen = []

    def objective(fwd, step, a):
        seen.append(torch.is_autocast_enabled("cpu"))
        return fwd(tokens).float().logsumexp(-1).mean(), {}, tokens.numel()

    cfg = TrainConfig(steps=1, lr=1e-4, warmup_steps=0, micro_batch=1, grad_accum=1, recompute_activations=False)
    train("t", model, list(model.parameters()), objective, cfg, tmp_path / "state.pt", "fp",
          torch.device("cpu"), Dist(), progress=False)
    assert seen == [native]
    assert TrainConfig(autocast=False).fingerprint() == TrainConfig().fingerprint() != TrainConfig(autocast=True).fingerprint()


def test_folding_the_adapter_scale_changes_no_output_and_drops_the_multiplication():
    from torch import nn

    from quant import lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=False))
    wrapped = lora.LoRALinear(model[0], 64, 96, rank=8, scale=2.0)
    nn.init.normal_(wrapped.lora_b.weight, std=0.1)
    x = torch.randn(5, 64)
    before = wrapped(x)
    lora.fold_scales(nn.Sequential(wrapped))
    assert wrapped.scale == 1.0
    assert torch.equal(wrapped(x), before)  # a power-of-two scale moves no bit
    graph = torch.export.export(wrapped, (x,)).graph
    assert not [n for n in graph.nodes if n.op == "call_function" and "mul" in str(n.target)]
