"""spinquant: learned rotations (SpinQuant, Liu et al. 2024), then GPTQ, into the spec'd scheme.

1. Fold the RMSNorm weights into the linears (quant.rotation.fold_norms) and put an online
   Hadamard transform (R4) before every FFN down projection, its inverse merged into w2.
2. Learn R1 (residual stream) and one R2 per layer (attention values/heads) with Cayley SGD
   (quant.cayley) on the next-token loss of the rotated network with its block weights
   fake-quantized to 4-bit group-32 and every block linear's and the classifier's input
   fake-quantized to 8-bit per token, straight-through gradients, as the .pte computes. The start
   is the identity or a random Hadamard matrix, whichever gives the lower quantized loss over
   the first few steps of the optimization (init_probe).
3. Merge R1, R2 into the weights, then GPTQ (quant.gptq) the block linears, each layer fitted to the
   float model's output rather than to its own float weights (gptq_asymmetric); the embedding and the
   classifier get the scheme's 8-bit round-to-nearest (quant.ptq).

The text both steps learn from: by default the model's own (gptq_samples sequences it writes before any
change, as qlora trains on), so no domain is favoured and no evaluation text is seen. With
inputs.calibration (`--calibration FILE`) the rotations learn on the file and GPTQ calibrates on it and,
by default, on as many self-written windows (gptq_data=mixed).

The learned rotations and the rotated, quantized checkpoint, with a manifest, are kept under
inputs.work_dir, so exporting again skips straight to lowering. The text the model writes and the
rotations' optimization state after every step are kept in ptekit's cache instead
(quant.sft_data.own_text_dir, shared_rotations): an interrupted run resumes where it stopped, and qlora's
start and later exports read what an earlier run learned.

Options (inputs.options; values may be strings as a CLI passes them):
  preset            paper (default with --device cuda) | cpu (default otherwise)
  rotation          learned | hadamard (random Hadamard R1/R2, no training) | none (GPTQ alone)
  init              auto | identity | hadamard
  r4                true | false
  iterations, lr, momentum, train_batch, train_seq_len, gptq, gptq_samples, gptq_seq_len,
  damp, act_order, true_sequential, scale_search, gptq_asymmetric, init_probe, init_eval_batches,
  checkpoint_layers, bf16
  gptq_data         with --calibration: calibration | generated (windows the model writes itself) | mixed
                    (half of each, the default); without it GPTQ's windows are all the model's own
inputs.steps overrides iterations, inputs.calibration the calibration text, inputs.seed the seed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from exporter import log
from exporter.atomic import atomic_dir, atomic_path
from exporter.errors import PtekitError
from exporter.manifest import update_with_file
from exporter.memory import RUNTIME_FLOOR, Need
from exporter.model import rope_tables
from exporter.progress import bar as progress_bar
from quant import data, fake_quant, rotation, sft_data
from quant.cayley import CayleySGD
from quant.gptq import GPTQOptions, calibration_bytes, dequantize, gptq_model, quantize_rtn
from quant.hadamard import random_hadamard
from quant.method import (
    MethodInputs,
    check_fingerprint,
    load_state,
    native_bf16,
    option_values,
    pop_preset,
    resolve_device,
    unreadable_work,
    update_with_weights,
    without_later_options,
)
from quant.ptq import apply_scheme

_log = log.get(__name__)
FORMAT = "ptekit-spinquant/1"
STATE = "rotation_state.pt"
RESULT = "result"  # the finished run's three files, written as one directory: all of them or none
ROTATIONS = "rotations.safetensors"
CHECKPOINT = "model.safetensors"
MANIFEST = "spinquant.json"


@dataclass(frozen=True)
class Settings:
    rotation: str = "learned"
    init: str = "auto"
    r4: bool = True
    iterations: int = 100
    lr: float = 1.5
    momentum: float = 0.0
    train_batch: int = 8
    train_seq_len: int = 2048
    gptq: bool = True
    gptq_samples: int = 128
    gptq_seq_len: int = 2048
    damp: float = 0.01
    # GPTQ in order of decreasing activation energy (static groups, so the .pte's layout is
    # unchanged): on SmolLM2 after the learned rotations it cut PPL from 34.07 to 33.06 (docs/spinquant.md).
    act_order: bool = True
    true_sequential: bool = True
    init_probe: int = 5  # init=auto: steps each start is optimized before the better one is kept
    init_eval_batches: int = 2  # init=auto with init_probe=0: batches the starts' loss is compared on
    checkpoint_layers: bool = True
    # Matmuls of the rotation training in bf16. None: where the device multiplies bf16 natively (a GPU
    # with bf16, a CPU with avx512_bf16 or AMX); on an AVX2 CPU bf16 GEMMs are several times slower than fp32.
    bf16: bool | None = None
    # GPTQ's group scales by quant.gptq.searched_group_scales: on SmolLM2 after the learned rotations it
    # moved PPL, KL and top-1 toward BF16 on both WikiText-2 and the docstrings (docs/spinquant.md).
    scale_search: bool = True
    # GPTQ's calibration windows when a calibration file is given: "calibration" (the file's text),
    # "generated" (text the model writes itself) or "mixed" (half of each; None resolves to it). On SmolLM2
    # with WikiText-2's validation split as the file and either of two learned rotations, mixed moved the
    # docstrings' KL from 0.118-0.120 to 0.091-0.095 and WikiText-2's (the file's domain) by at most
    # +0.0035 (docs/spinquant.md). Without a file (the default) the rotations and GPTQ both learn on the
    # model's own text and this is "generated".
    gptq_data: str | None = None
    # GPTQ fits each layer's output on its quantized inputs to the float model's output (quant.gptq,
    # GPTQOptions.asymmetric). On SmolLM2's .pte, with the same learned rotations, it moved KL to BF16 from
    # 0.0975 to 0.0793 on WikiText-2 and from 0.0908 to 0.0831 on the docstrings; GPTQ took 12 minutes
    # instead of 6.5 on 2 cores (docs/spinquant.md).
    gptq_asymmetric: bool = True
    seed: int = 0

    def gptq_options(self) -> GPTQOptions:
        return GPTQOptions(damp=self.damp, act_order=self.act_order, true_sequential=self.true_sequential,
                           scale_search=self.scale_search, asymmetric=self.gptq_asymmetric)


PRESETS = {
    # The paper's: 800 samples of 2048 tokens (100 iterations of 8) for the rotations, 128 for GPTQ.
    "paper": Settings(),
    # SmolLM2-135M on 2 CPU cores: four 512-token windows per iteration (about 10 s a step there),
    # GPTQ on 256 windows of 512. Against one window per iteration and 64 for GPTQ (3.5 s a step)
    # four windows and 128 for GPTQ cut SmolLM2's NLL gap to bf16 from +0.155 to +0.130 nats; 256 for
    # GPTQ instead of 128 then moved KL to BF16 from 0.0793 to 0.0741 on WikiText-2 and from 0.0831 to
    # 0.0794 on the docstrings, for GPTQ's 23 minutes instead of 12 (docs/spinquant.md).
    # On the model's own text, 512 sequences instead of 256 moved KL 4% closer on WikiText-2 and the
    # docstrings and left the licences level, for about half as long again (docs/spinquant.md).
    "cpu": Settings(iterations=100, train_batch=4, train_seq_len=512, gptq_samples=256, gptq_seq_len=512,
                    init_eval_batches=4, checkpoint_layers=False),
}


def settings_from(inputs) -> Settings:
    opts = dict(inputs.options or {})
    base = pop_preset("spinquant", opts, inputs.device, PRESETS)
    changes = option_values("spinquant", Settings, opts)
    if inputs.steps is not None:
        changes["iterations"] = int(inputs.steps)
    changes.setdefault("seed", inputs.seed)
    own_text = inputs.calibration is None
    if own_text and changes.get("gptq_data") in ("calibration", "mixed"):
        raise PtekitError(f"spinquant: gptq_data={changes['gptq_data']} calibrates GPTQ on a calibration file; "
                          "pass one with --calibration FILE (without it spinquant learns on the model's own text)")
    if changes.get("gptq_data") is None:
        changes["gptq_data"] = "generated" if own_text else "mixed"
    s = dataclasses.replace(base, **changes)
    if s.bf16 is None:
        s = dataclasses.replace(s, bf16=native_bf16(resolve_device(inputs.device)))
    for key, allowed in (("rotation", ("learned", "hadamard", "none")), ("init", ("auto", "identity", "hadamard")),
                         ("gptq_data", ("calibration", "generated", "mixed"))):
        if getattr(s, key) not in allowed:
            raise PtekitError(f"spinquant: option {key}={getattr(s, key)!r}; choose one of {', '.join(allowed)}")
    if s.iterations < 0 or s.train_batch < 1 or s.gptq_samples < 1:
        raise PtekitError("spinquant: iterations must be >= 0, train_batch and gptq_samples >= 1")
    return s


# --- the training loss ------------------------------------------------------------------------------


class _QuantTrainLinear(nn.Module):
    """A block linear during training: its weight is set per step (rotated), quantized on the fly."""

    def __init__(self, hadamard: nn.Module | None):
        super().__init__()
        self.hadamard = hadamard
        self.w: torch.Tensor | None = None

    def forward(self, x):
        if self.hadamard is not None:
            x = self.hadamard(x)
        return F.linear(fake_quant.act(x), fake_quant.block_weight(self.w))


class QuantizedLoss:
    """Next-token loss of the rotated, fake-quantized network, as a function of R1 and R2.

    Takes a folded model (R4 already merged). The classifier's 8-bit weight rounding is left out:
    modelling it costs a vocab x dim x dim product per step, more than the tokens on a CPU; its
    8-bit input quantization is kept.
    """

    def __init__(self, model: nn.Module, device: str, checkpoint_layers: bool = False, bf16: bool = True):
        self.cfg = model.config
        self.device = device
        # Matmuls in bf16 (rotating the weights and running the network); rotations, weights and
        # the quantizers' arithmetic stay fp32. Two to three times faster on CPUs with bf16 dot products.
        self.bf16 = bf16
        self.checkpoint_layers = checkpoint_layers
        self.emb = model.tok_embeddings.weight.detach().to(device)
        self.out = model.output.weight.detach().to(device, torch.bfloat16 if bf16 else torch.float32)
        self.norm = copy.deepcopy(model.norm).to(device)
        self.base, self.blocks = [], []
        for layer in model.layers:
            dtype = torch.bfloat16 if bf16 else torch.float32
            self.base.append({k: v.detach().to(device, dtype) for k, v in rotation.layer_weights(layer).items()})
            block = copy.deepcopy(layer)  # one layer's weights at a time; the linears' are dropped below
            for mod in (block.attention, block.feed_forward):
                for name, child in list(mod.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(mod, name, _QuantTrainLinear(getattr(child, "hadamard", None)))
            self.blocks.append(block.to(device))
        self.cos, self.sin = model.freqs_cos.to(device), model.freqs_sin.to(device)

    def _block(self, i, h, r1, r2, rope):
        c = self.cfg
        w = rotation.rotate_layer(self.base[i], r1, r2, c.n_heads, c.n_kv_heads, c.head_dim)
        block = self.blocks[i]
        for name, t in w.items():
            block.get_submodule(name).w = t
        out = block(h, rope)
        for name in w:
            block.get_submodule(name).w = None
        return out

    def __call__(self, tokens: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._loss(tokens, r1, r2)

    def _loss(self, tokens: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        S = tokens.shape[1]
        rope = rope_tables(self.cos[:S], self.sin[:S])
        h = fake_quant.embedding_rows(self.emb[tokens] @ r1)
        for i in range(len(self.blocks)):
            if self.checkpoint_layers and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(self._block, i, h, r1, r2[i], rope, use_reentrant=False)
            else:
                h = self._block(i, h, r1, r2[i], rope)
        h = self.norm(h)
        logits = F.linear(fake_quant.act(h) @ r1.t(), self.out)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def random_rotations(cfg, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r1 = random_hadamard(cfg.dim, g)
    r2 = torch.stack([random_hadamard(cfg.head_dim, g) for _ in range(cfg.n_layers)])
    return r1, r2


def identity_rotations(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    eye = torch.eye(cfg.dim, dtype=torch.float64), torch.eye(cfg.head_dim, dtype=torch.float64)
    return eye[0], eye[1].repeat(cfg.n_layers, 1, 1)


@torch.no_grad()
def quantized_loss(loss_fn: QuantizedLoss, pool: torch.Tensor, s: Settings, r1, r2) -> float:
    r1, r2 = r1.to(loss_fn.device, torch.float32), r2.to(loss_fn.device, torch.float32)
    return sum(loss_fn(data.batch(pool, b, s.train_batch), r1, r2).item() for b in range(s.init_eval_batches)) / s.init_eval_batches


def shared_rotations(model: nn.Module, pool: torch.Tensor, s: Settings, device: str = "cpu",
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """learn_rotations with its state kept in ptekit's cache, under a hash of all it depends on: the folded
    model's weights, the training windows and the training settings (TRAINING_FIELDS). spinquant and qlora's
    learned start, and exports to other outputs, learn the same rotations on the same text, so whichever
    runs first learns them and the others read them (an interrupted run resumes there); two runs at once
    learn them once, the second waiting for the first."""
    from exporter.atomic import held_lock
    from exporter.defaults import cache_dir

    h = update_with_weights(hashlib.sha256(), model)
    h.update(pool.to("cpu", torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps({k: getattr(s, k) for k in TRAINING_FIELDS}, sort_keys=True).encode())
    key = h.hexdigest()
    state_dir = cache_dir() / "rotations" / key[:16]
    with held_lock(state_dir):
        return learn_rotations(model, pool, s, state_dir, key, device, progress=progress)


def learn_rotations(model: nn.Module, pool: torch.Tensor, s: Settings, work_dir: Path, fingerprint: str,
                    device: str = "cpu", on_step=None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Cayley SGD on R1, R2 from a folded model. Saves its state after every step under work_dir
    and continues from there when the state matches `fingerprint` (a state that does not is an
    error: quant.method's resume policy). on_step(step, loss) is called after each saved step.
    Returns (R1, R2, record)."""
    loss_fn = QuantizedLoss(model, device, s.checkpoint_layers and device != "cpu", s.bf16)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    state_path = Path(work_dir) / STATE
    state = load_state(state_path, fingerprint, work_dir)
    if state is None:
        run = _start(loss_fn, pool, s, model.config, device, progress)
        _save_state(state_path, run.state(fingerprint))  # the probes' steps count: they may be all there are
    else:
        run = _Run(state["r1"], state["r2"], device, s, state["optimizer"], state["step"], state["record"])
        if run.step < s.iterations:
            _log.info(f"spinquant: resuming the rotation optimization at step {run.step} of {s.iterations}")
    bar = progress_bar(range(run.step, s.iterations), desc="spinquant rotations", unit="step", disable=not progress,
               initial=run.step, total=s.iterations)
    for _ in bar:
        loss = run.advance(loss_fn, pool, s)
        bar.set_postfix(loss=f"{loss:.3f}")
        _save_state(state_path, run.state(fingerprint))
        if on_step is not None:
            on_step(run.step, loss)
    return run.result()


class _Run:
    """One rotation optimization: the parameters, the optimizer and what it has recorded so far."""

    def __init__(self, r1, r2, device, s: Settings, opt_state=None, step=0, record=None):
        self.r1 = nn.Parameter(r1.to(device, torch.float32))
        self.r2 = nn.Parameter(r2.to(device, torch.float32))
        self.opt = CayleySGD([self.r1, self.r2], lr=s.lr, momentum=s.momentum)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
        self.step = step
        self.record = record if record is not None else {"losses": [], "init_losses": {}}

    def advance(self, loss_fn: QuantizedLoss, pool: torch.Tensor, s: Settings) -> float:
        """One step on batch `step` at the cosine schedule's rate for `step`: a run's steps are the
        same whether it went through the start probe or not."""
        for group in self.opt.param_groups:
            group["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * self.step / s.iterations))  # no warmup
        loss = loss_fn(data.batch(pool, self.step, s.train_batch), self.r1, self.r2)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        self.record["losses"].append(round(loss.item(), 5))
        return loss.item()

    def state(self, fingerprint: str) -> dict:
        return dict(fingerprint=fingerprint, step=self.step, r1=self.r1.detach().cpu(), r2=self.r2.detach().cpu(),
                    optimizer=_cpu(self.opt.state_dict()), record=self.record)

    def result(self):
        # The optimizer's float64 masters are orthogonal to float64 rounding; the parameters only to float32's.
        return tuple(self.opt.state[p]["master"].cpu() if "master" in self.opt.state[p] else p.detach().double().cpu()
                     for p in (self.r1, self.r2)) + (self.record,)


def _start(loss_fn, pool, s: Settings, cfg, device, progress: bool) -> _Run:
    """The run to continue. For init=auto both starts take the first `init_probe` steps of the
    optimization on the same batches and the lower mean loss goes on: on SmolLM2 the identity has
    the lower loss before any step (its weights sit on the GGUF's 4-bit grid) and the higher one
    from the first step on, and ends worse (docs/spinquant.md). init_probe=0 compares
    the starts' loss before any step, on init_eval_batches batches."""
    candidates = {"identity": identity_rotations(cfg), "hadamard": random_rotations(cfg, s.seed)}
    if s.init != "auto":
        run = _Run(*candidates[s.init], device, s)
        run.record["init"] = s.init
        return run
    runs, scores = {}, {}
    for name, (r1, r2) in candidates.items():
        runs[name] = _Run(r1, r2, device, s)
        if s.init_probe:
            probe = progress_bar(range(min(s.init_probe, s.iterations)), desc=f"spinquant start probe: {name}",
                         unit="step", leave=False, disable=not progress)
            losses = [runs[name].advance(loss_fn, pool, s) for _ in probe]
            scores[name] = round(sum(losses) / max(len(losses), 1), 5)
        else:
            scores[name] = round(quantized_loss(loss_fn, pool, s, r1, r2), 5)
    best = min(scores, key=scores.get)
    what = f"mean loss of the first {s.init_probe} steps" if s.init_probe else "quantized calibration loss at start"
    _log.info(f"spinquant: {what} {scores}; going on from {best}")
    run = runs[best]
    run.record.update(init=best, init_losses=scores, init_probe=s.init_probe)
    return run


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


def _save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# --- the method ---------------------------------------------------------------------------------


# The settings the learned rotations depend on (with the weights and the windows: shared_rotations); the
# GPTQ settings are left out, so that changing them reuses the rotations. On the model's own text (no
# --calibration) gptq_samples and gptq_seq_len also decide the windows, so changing either learns them again.
TRAINING_FIELDS = ("rotation", "init", "r4", "iterations", "lr", "momentum", "train_batch", "train_seq_len",
                   "init_probe", "init_eval_batches", "bf16", "seed")


# Options added after results were saved, with the value that reproduces what ran before them: at that value
# the option stays out of the fingerprint, so older results keep theirs.
OPTIONS_ADDED_LATER = {"scale_search": False, "gptq_data": "calibration", "gptq_asymmetric": False}


def fingerprints(model: nn.Module, s: Settings, calibration: Path | None) -> tuple[str, str]:
    """(text, result): hashes of what each depends on. The model's own text depends on its weights alone
    (and on its count, length and seed, which generated_windows adds); the result also on the calibration
    text and every setting. (The rotations' state is keyed by shared_rotations.)"""
    h = update_with_weights(hashlib.sha256(), model)
    text = h.hexdigest()[:16]  # quant.method.weights_hash(model), without hashing the weights twice
    if calibration is not None:
        update_with_file(h, Path(calibration))
    elif s.rotation == "learned" or s.gptq:  # the model's own text: how many sequences it writes, and how long
        h.update(json.dumps(["own text", s.gptq_samples, s.train_seq_len, s.gptq_seq_len]).encode())
    settings = without_later_options(dataclasses.asdict(s), OPTIONS_ADDED_LATER)
    h.update(json.dumps({k: settings[k] for k in settings}, sort_keys=True).encode())
    return text, h.hexdigest()


def _prepare(model: nn.Module, s: Settings) -> bool:
    """Folds the norms and inserts R4 as the settings ask; returns whether R4 is in."""
    if s.rotation == "none":
        return False
    rotation.fold_norms(model)
    if s.r4 and not rotation.r4_supported(model.config.hidden_dim):
        _log.warning(f"spinquant: no Hadamard construction for the FFN size {model.config.hidden_dim}; "
                     "running without the online R4 transform")
        return False
    if s.r4:
        rotation.insert_r4(model)
    return s.r4


def hadamard_gptq(model: nn.Module, tokens: torch.Tensor, seed: int, device: str = "cpu", progress: bool = True,
                  scale_search: bool = False, asymmetric: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`-O rotation=hadamard` on a float model, in place: norms folded, R4 online where the FFN size
    allows, random Hadamard R1/R2 merged, then GPTQ of the block linears on `tokens`. Returns GPTQ's
    {linear: (integers, scales)}; the model holds their dequantized weights. The start qlora's
    rotation=hadamard trains from."""
    s = Settings(rotation="hadamard", seed=seed, scale_search=scale_search, gptq_asymmetric=asymmetric)
    _prepare(model, s)
    rotation.apply_rotations(model, *random_rotations(model.config, seed))
    return gptq_model(model, tokens, s.gptq_options(), device, progress=progress)


def learned_gptq(model: nn.Module, tokens: torch.Tensor, gptq_samples: int, seed: int, device: str = "cpu",
                 progress: bool = True, scale_search: bool = False,
                 asymmetric: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`-O rotation=learned` on a float model, in place: as hadamard_gptq, with R1/R2 learned first by
    this method's Cayley SGD (its preset for `device`) on the windows `tokens`, and GPTQ on the first
    `gptq_samples` of them. The optimization's state is kept where spinquant keeps its own
    (shared_rotations): on the same windows, which qlora's own text gives, the two learn the same rotations
    once. On text the model wrote itself, the next-token loss the rotations learn is, in expectation, the
    KL to the model plus its own entropy (a constant): the rotations are fit to the model, not to a domain."""
    # Without a calibration file, as qlora's start calls it: settings_from reads no path from the inputs.
    s = settings_from(MethodInputs(work_dir=Path(), device=device, seed=seed,
                                   options={"scale_search": scale_search, "gptq_asymmetric": asymmetric}))
    _prepare(model, s)
    r1, r2, _ = shared_rotations(model, tokens[:, : s.train_seq_len], s, device, progress=progress)
    rotation.apply_rotations(model, r1, r2)
    return gptq_model(model, tokens[:gptq_samples], s.gptq_options(), device, progress=progress)


def rotated_structure(model: nn.Module) -> None:
    """The layout hadamard_gptq and learned_gptq leave (norms folded, R4 modules in), for loading
    their weights into."""
    _prepare(model, Settings(rotation="hadamard"))


def quantize(model: nn.Module, inputs) -> nn.Module:
    s = settings_from(inputs)
    device = resolve_device(inputs.device)
    work = Path(inputs.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    needs_text = s.rotation == "learned" or s.gptq
    # None: the model's own text, written below (the default); otherwise the user's calibration file.
    calibration = Path(inputs.calibration) if inputs.calibration and needs_text else None
    if calibration is not None:
        data.read_text(calibration)  # a bad file fails here, before any work
    if needs_text and inputs.tokenizer is None:
        raise PtekitError("spinquant: needs the checkpoint's tokenizer to write or read its calibration text")
    model = model.float()
    text_fp, fp = fingerprints(model, s, calibration)

    saved = load_result(work, fp)
    if saved is not None:
        _log.info(f"spinquant: using the rotated, quantized checkpoint in {work} (delete it to optimize again)")
        _prepare(model, s)
        floats, weights = saved
        loaded = model.load_state_dict(floats, strict=False)  # the block linears come as integers below
        if loaded.unexpected_keys or set(loaded.missing_keys) - {f"{n}.weight" for n in weights}:
            raise PtekitError(f"{work / RESULT / CHECKPOINT}: does not fit this model; delete {work} to quantize again")
        return apply_scheme(model, weights)

    t0 = time.perf_counter()
    seconds, record = {}, {}
    pool, tokens = None, None
    if needs_text:
        pool, tokens = text_windows(model.to(device), inputs.tokenizer, s, calibration, text_fp)
        seconds["text"] = round(time.perf_counter() - t0, 1)  # written by the model, or read from the file
    r4 = _prepare(model, s)
    r1 = r2 = None
    if s.rotation == "learned":
        if s.iterations * s.train_batch > len(pool):
            source = calibration or f"the model's own text ({s.gptq_samples} sequences)"
            _log.warning(f"spinquant: {source} holds {len(pool)} windows of {s.train_seq_len} tokens; the "
                         f"{s.iterations * s.train_batch} training samples go through them more than once")
        r1, r2, record = shared_rotations(model, pool, s, device)
    elif s.rotation == "hadamard":
        r1, r2 = random_rotations(model.config, s.seed)
    seconds["rotations"] = round(time.perf_counter() - t0, 1)
    if r1 is not None:
        rotation.apply_rotations(model, r1, r2)

    t1 = time.perf_counter()
    names = [f"layers.{i}.{n}" for i in range(model.config.n_layers) for n in rotation.LAYER_LINEARS]
    if s.gptq:
        weights = gptq_model(model, tokens, s.gptq_options(), device)
    else:
        weights = {}
        for name in names:
            lin = model.get_submodule(name)
            weights[name] = quantize_rtn(lin.weight.detach())
            lin.weight.data = dequantize(*weights[name])
    seconds["gptq" if s.gptq else "rtn"] = round(time.perf_counter() - t1, 1)

    floats = {k: v.detach().clone() for k, v in model.state_dict().items() if not _is_block_linear(k)}
    record["calibration"] = {"path": str(calibration) if calibration is not None else None,
                             "text": "file" if calibration is not None else "own" if needs_text else None,
                             "training_tokens": s.iterations * s.train_batch * s.train_seq_len
                             if s.rotation == "learned" else 0,
                             "gptq_tokens": s.gptq_samples * s.gptq_seq_len if s.gptq else 0,
                             "gptq_data": s.gptq_data}
    save_result(work, fp, s, floats, weights, r1, r2, r4, record, seconds)
    return apply_scheme(model, weights)


def text_windows(model: nn.Module, tokenizer, s: Settings, calibration: Path | None,
                 text_fp: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the rotations' training windows, GPTQ's calibration windows), None where that step does not run.
    Without a calibration file both come from gptq_samples sequences the model writes, one token longer
    than the longest window: in the cpu preset the 256 x 513 tokens qlora's default trains on (the same
    sampler and seed), so both methods see the same text. With a file the rotations read its windows
    and GPTQ takes gptq_data's share of self-written windows first, the file's for the rest."""
    learned = s.rotation == "learned"
    if calibration is None:
        length = max(s.train_seq_len if learned else 0, s.gptq_seq_len) + 1
        own = generated_windows(model, tokenizer, s.gptq_samples, length, s, text_fp)
        return (own[:, : s.train_seq_len] if learned else None), (own[:, : s.gptq_seq_len] if s.gptq else None)
    stream = data.token_stream(calibration, tokenizer)
    pool = data.windows(stream, s.train_seq_len, s.seed, at_least=s.train_batch, source=calibration) if learned else None
    if not s.gptq:
        return pool, None
    generated = None
    if s.gptq_data != "calibration":
        n = s.gptq_samples if s.gptq_data == "generated" else s.gptq_samples // 2
        generated = generated_windows(model, tokenizer, n, s.gptq_seq_len, s, text_fp)
    # With gptq_data=mixed the file need only hold the windows the generated ones leave.
    needed = s.gptq_samples - (len(generated) if generated is not None else 0)
    tokens = data.windows(stream, s.gptq_seq_len, s.seed + 1, at_least=needed, source=calibration)
    if generated is not None:  # the generated windows first, the file's windows for the rest
        tokens = torch.cat([generated, tokens])
    return pool, tokens[: s.gptq_samples]


def generated_windows(model: nn.Module, tokenizer, n: int, length: int, s: Settings,
                      text_fp: str) -> torch.Tensor:
    """n sequences of `length` tokens written by the model as it is, before anything rotates it: [n, length]
    (sft_data.own_text keeps them in ptekit's cache, where qlora finds them; text_fp: quant.method.weights_hash of
    the model)."""
    examples = sft_data.own_text(model, tokenizer, n, length, s.seed, sft_data.own_text_dir(), text_fp,
                                 what="calibration text")
    return torch.tensor([e.tokens for e in examples])


def _is_block_linear(key: str) -> bool:
    return key.startswith("layers.") and any(key.endswith(f"{n}.weight") for n in rotation.LAYER_LINEARS)


def save_result(work: Path, fp: str, s: Settings, floats: dict, weights: dict, r1, r2, r4: bool,
                record: dict, seconds: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in floats.items()}
    for name, (q, scale) in weights.items():
        tensors[f"{name}.qdata"] = q.contiguous()
        tensors[f"{name}.scale"] = scale.contiguous()
    manifest_text = json.dumps(_result_manifest(fp, s, r1, r2, r4, record, seconds), indent=1) + "\n"
    with atomic_dir(work / RESULT) as tmp:
        save_file(tensors, str(tmp / CHECKPOINT), metadata={"fingerprint": fp})
        if r1 is not None:
            save_file({"R1": r1.contiguous(), "R2": r2.contiguous()}, str(tmp / ROTATIONS))
        (tmp / MANIFEST).write_text(manifest_text)


def _result_manifest(fp: str, s: Settings, r1, r2, r4: bool, record: dict, seconds: dict) -> dict:
    return {
        "format": FORMAT,
        "fingerprint": fp,
        "settings": dataclasses.asdict(s),
        "rotations": {"R1": r1 is not None, "R2": r2 is not None, "R4_online_hadamard": r4,
                      "file": ROTATIONS if r1 is not None else None},
        "calibration": record.get("calibration"),
        "init": record.get("init"),
        "init_losses": record.get("init_losses"),
        "losses": record.get("losses"),
        "weights": {"block_linears": "GPTQ" if s.gptq else "round to nearest", "file": CHECKPOINT},
        "seconds": seconds,
    }


def load_result(work: Path, fp: str):
    """(float tensors, {linear: (integers, scales)}) saved by a finished run with this fingerprint;
    None when there is no result. A result of another run is an error (quant.method's resume policy)."""
    result = work / RESULT
    path = result / MANIFEST
    # The result is written as one directory (save_result), so it is there whole or not at all.
    if not result.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise unreadable_work(path, work, type(e).__name__) from None
    if manifest.get("format") != FORMAT:
        raise unreadable_work(path, work, f"format {manifest.get('format')!r}, not {FORMAT}")
    # Starting over loses no learned rotations: they are kept in ptekit's cache (shared_rotations), and a
    # run whose rotations depend on nothing that changed reads them there.
    check_fingerprint(path, manifest.get("fingerprint"), fp, work)
    from safetensors import safe_open

    # The checkpoint carries the fingerprint too, so a result directory assembled by hand from two
    # runs is not taken for either.
    try:
        f = safe_open(str(result / CHECKPOINT), framework="pt")
    except Exception as e:  # a missing or damaged file: safetensors raises its own types
        raise unreadable_work(result / CHECKPOINT, work, type(e).__name__) from None
    with f:
        check_fingerprint(result / CHECKPOINT, (f.metadata() or {}).get("fingerprint"), fp, work)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weights, floats = {}, {}
    for key, t in tensors.items():
        if key.endswith(".qdata"):
            name = key[: -len(".qdata")]
            weights[name] = (t, tensors[f"{name}.scale"])
        elif not key.endswith(".scale"):
            floats[key] = t
    return floats, weights


def memory_need(cfg, parameters: int, inputs) -> Need:
    """The quantize stage's peak, estimated from the shape (exporter/memory.py): the model in fp32 (4 bytes a
    parameter), with the folded and rotated copies the rotation training makes of each weight on top. On the
    Llama 3.2 3B shape the rotation setup alone reached 21,199 MiB (6.9 bytes a parameter). GPTQ holds the
    fp32 model and its calibration windows' hidden states, twice with asymmetric calibration (the float
    model's beside the quantized one's)."""
    s = settings_from(inputs)
    hidden = calibration_bytes(s.gptq_samples, s.gptq_seq_len, cfg.dim, s.gptq_asymmetric) if s.gptq else 0
    return Need("quantize (spinquant)", max(7 * parameters, 4 * parameters + hidden) + RUNTIME_FLOOR,
                "--method ptq, which needs no fp32 copy")
