"""qlora's training loop in real processes: a run killed midway resumes to the same result, and two
processes over torch.distributed (gloo, CPU) train what one process with the same global batch
trains. A 2-layer model with a 512-token vocabulary and self-generated data keeps each run to
seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cached_dir, write_tiny_hf

REPO = Path(__file__).resolve().parent.parent

# Runs quant.qlora.quantize on a checkpoint. With HANG=round:step it stops dead (sleeps) right
# after writing that round's checkpoint at that step, so the test can kill it there.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from exporter.checkpoint import build_model, load_checkpoint
from quant.method import MethodInputs
import quant.train as T
import quant.qlora as Q

ckpt, work, options = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
hang = os.environ.get("HANG")
if hang:
    round_name, at = hang.split(":")
    save = T.save_state
    def save_then_hang(path, model, names, opt, sched, step, *rest):
        save(path, model, names, opt, sched, step, *rest)
        if path.parent.name == round_name and step == int(at):
            (work / "hanging").touch()
            time.sleep(600)
    T.save_state = save_then_hang
model = build_model(load_checkpoint(ckpt), max_seq_len=64)
Q.quantize(model, MethodInputs(work_dir=work, calibration=Path("self"), options=options))
"""

OPTIONS = dict(qat_steps=4, lora_steps=4, seq_len=32, micro_batch=2, grad_accum=2, checkpoint_every=1,
               gen_sequences=8, warmup_steps=1, lr=1e-3, lora_lr=1e-2, progress=False)


def run_child(tmp: Path, ckpt: Path, work: Path, options: dict, hang: str | None = None, nproc: int = 1):
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HANG", None)
    if hang:
        env["HANG"] = hang
    cmd = [sys.executable, str(script), str(ckpt), str(work), json.dumps(options)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def trained(work: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(work / "trained" / "model.safetensors")


@pytest.fixture(scope="module")
def tiny512(smollm2_hf) -> Path:
    return cached_dir("tiny-hf-v512", lambda d: write_tiny_hf(d, smollm2_hf, vocab_size=512))


@pytest.fixture(scope="module")
def reference(tiny512, tmp_path_factory) -> Path:
    """One uninterrupted single-process run."""
    tmp = tmp_path_factory.mktemp("reference")
    finish(run_child(tmp, tiny512, tmp / "work", OPTIONS))
    return tmp / "work"


@pytest.mark.parametrize("round_name", ["qat", "lora"])
def test_killed_run_resumes_to_the_same_result(tiny512, reference, tmp_path, round_name):
    work = tmp_path / "work"
    proc = run_child(tmp_path, tiny512, work, OPTIONS, hang=f"{round_name}:2")
    deadline = time.time() + 300
    while not (work / "hanging").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "the child never reached step 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(work / round_name / "state.pt", weights_only=True)
    assert state["step"] == 2 and not state["done"]
    assert not (work / "trained").exists()

    (work / "hanging").unlink()
    finish(run_child(tmp_path, tiny512, work, OPTIONS))
    ours, ref = trained(work), trained(reference)
    assert ours.keys() == ref.keys() and any(".lora_a." in k for k in ours)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_two_processes_over_gloo_match_one_process(tiny512, reference, tmp_path):
    # 2 processes x 1 micro-batch per step see exactly the reference's 1 process x 2.
    work = tmp_path / "work"
    finish(run_child(tmp_path, tiny512, work, {**OPTIONS, "grad_accum": 1}, nproc=2))
    ours, ref = trained(work), trained(reference)
    assert ours.keys() == ref.keys()
    init = build_initial(tiny512)
    moved = 0.0
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=2e-5, rtol=1e-4)
        if k in init:
            moved = max(moved, (ref[k] - init[k]).abs().max().item())
    assert moved > 1e-3  # training changed the weights, so the agreement says something


def build_initial(ckpt: Path) -> dict[str, torch.Tensor]:
    from exporter.checkpoint import build_model, load_checkpoint

    return {k: v for k, v in build_model(load_checkpoint(ckpt), max_seq_len=64).state_dict().items()}


def test_schedule_warms_up_then_decays_to_zero():
    from quant.train import TrainConfig, cosine_schedule

    f = cosine_schedule(TrainConfig(steps=20, warmup_steps=4))
    lrs = [f(s) for s in range(21)]
    assert lrs[0] < lrs[1] < lrs[3] < lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[20] == pytest.approx(0.0)


def test_distillation_is_zero_against_itself_and_ce_only_on_targets():
    from quant.train import TrainConfig, loss_fn

    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2:] = True
    loss, parts = loss_fn(logits, targets, mask, logits.clone(), TrainConfig())
    assert parts["kd"].abs().item() < 1e-6
    expected = torch.nn.functional.cross_entropy(logits[0, 2:], targets[0, 2:])
    torch.testing.assert_close(parts["ce"], expected)
    logits2 = logits.clone()
    logits2[1] += torch.randn(5, 11) * 10  # positions outside the mask do not count
    _, parts2 = loss_fn(logits2, targets, mask, logits, TrainConfig())
    assert parts2["kd"].abs().item() < 1e-6


def test_recomputed_blocks_and_chunked_distillation_keep_the_gradients_and_drop_the_saved_activations(tiny_hf):
    """Activation checkpointing and the chunked KL change what the backward pass keeps, not what it
    computes: same loss and gradients as the plain formula, far fewer block activations kept."""
    import copy

    import torch.nn.functional as F

    from exporter.checkpoint import build_model, load_checkpoint
    from quant.train import KD_CHUNK, TrainConfig, loss_fn, recomputed_blocks

    torch.manual_seed(0)
    model = build_model(load_checkpoint(tiny_hf), max_seq_len=256).float()
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tokens = torch.randint(0, model.config.vocab_size, (2, 201))
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones_like(tgt, dtype=torch.bool)
    assert mask.sum() > KD_CHUNK  # more than one chunk
    with torch.no_grad():
        t_logits = teacher(inp)

    params = {p.data_ptr() for p in model.parameters()}

    def run(recompute: bool):
        """(loss, gradients, bytes the blocks and the loss keep for the backward)."""
        model.zero_grad(set_to_none=True)
        saved = {"blocks": 0, "loss": 0}
        phase = "blocks"

        def pack(t):
            if t.data_ptr() not in params:  # weights are kept either way
                saved[phase] += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), recomputed_blocks(model, recompute):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                h = model.tok_embeddings(inp)
                rope = model.rope(0, inp.shape[1])
                for layer in model.layers:
                    h = layer(h, rope)
                phase = "loss"
                logits = model.output(model.norm(h)).float()
                if recompute:
                    loss, _ = loss_fn(logits, tgt, mask, t_logits, TrainConfig(ce_weight=0.0))
                else:  # the formula written out, in one piece
                    loss = F.kl_div(F.log_softmax(logits.flatten(0, 1), -1), F.log_softmax(t_logits.flatten(0, 1), -1),
                                    log_target=True, reduction="batchmean")
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved

    keys = list(model.state_dict())
    plain_loss, plain_grads, plain_saved = run(False)
    loss, grads, saved = run(True)
    torch.testing.assert_close(loss, plain_loss)
    for n, g in plain_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    # Each block keeps its input alone, not its intermediates. (The chunked loss keeps as much as the
    # plain one; what it saves is the transient [positions, vocabulary] tensors, one chunk at a time.)
    assert saved["blocks"] < plain_saved["blocks"] / 5, (saved, plain_saved)
    assert list(model.state_dict()) == keys and "forward" not in vars(model.layers[0])  # the model is as before


def _steps(model, opt, batches):
    for x in batches:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_bf16_optimizer_state_follows_adamw_and_resumes_from_a_weights_only_checkpoint(tmp_path):
    import copy
    import io

    from quant.optim import CHUNK, AdamWBf16State

    torch.manual_seed(0)
    # One weight larger than a chunk, so the sliced update is exercised.
    start = torch.nn.Sequential(torch.nn.Linear(512, CHUNK // 512 + 3), torch.nn.Linear(CHUNK // 512 + 3, 8))
    batches = [torch.randn(16, 512) for _ in range(6)]
    ref, ours = copy.deepcopy(start), copy.deepcopy(start)
    _steps(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01), batches)
    opt = AdamWBf16State(ours.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    _steps(ours, opt, batches[:3])

    # Resume: the state goes through torch.save and a weights_only load, as quant/train.py's checkpoint does.
    buf = io.BytesIO()
    torch.save({"optim": opt.state_dict(), "params": ours.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = copy.deepcopy(start)
    resumed.load_state_dict(saved["params"])
    opt2 = AdamWBf16State(resumed.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    opt2.load_state_dict(saved["optim"])
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt2.state.values())
    _steps(resumed, opt2, batches[3:])
    _steps(ours, opt, batches[3:])

    for (name, a), b, r, s in zip(ours.named_parameters(), resumed.parameters(), ref.parameters(), start.parameters(),
                                  strict=True):
        assert torch.equal(a, b), name  # resuming is exact
        moved = (r - s).abs().max().item()
        assert moved > 3e-3, name  # 6 steps at lr 1e-3 moved the weights: the comparison says something
        # bf16 moments round at 3 significant digits; the weights follow fp32 AdamW to a few percent of a step
        assert (a - r).abs().max().item() < 0.05 * moved, name


def test_teacher_stores_exact_bf16_weights_in_bf16_and_computes_the_same():
    from quant.qlora import store_in_bf16_where_exact

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 48, bias=False),
                                torch.nn.Linear(48, 64, bias=False), torch.nn.Linear(32, 64, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(model[1].weight.bfloat16().float())  # a BF16 checkpoint's weight
        model[2].weight.copy_(model[2].weight.bfloat16().float())
        model[2].weight[0, 0] += 1e-6  # one value bf16 cannot hold: this weight stays fp32
    model[3].weight = model[0].weight  # tied: stays fp32
    x = torch.randint(0, 64, (2, 5))

    def forward(m):
        h = m[0](x)
        return m[2](torch.relu(m[1](h))), m[3](h)

    before = forward(model)
    assert store_in_bf16_where_exact(model) == 32 * 48 * 2
    stored = {n: p.dtype for n, p in model.named_parameters()}
    assert stored["1.parametrizations.weight.original"] == torch.bfloat16
    assert stored["2.weight"] == torch.float32 and stored["0.weight"] == torch.float32
    after = forward(model)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
