"""The training loop of qlora's rounds: AdamW, warmup then cosine, gradient accumulation, bf16
autocast where the device has it, a resumable checkpoint every N steps, and data parallelism
over torch.distributed (DDP; launched with torchrun, NCCL on GPUs, gloo on CPUs).

Loss: cross-entropy on the response tokens, plus distillation (KL from the teacher's
distribution to the student's) on the same positions when a teacher is given.

Memory: each transformer block's activations are recomputed in the backward pass rather than kept
(activation checkpointing), and the distillation loss is computed a chunk of positions at a time,
so neither the blocks' activations nor the [tokens, vocabulary] intermediates of the loss are held
for the whole micro-batch.

Resuming gives the same result as not stopping: the batch of every step is a function of the
seed and the step number alone, and the checkpoint holds the trained parameters, the optimizer
and the schedule.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from quant.method import load_state, native_bf16, resolve_device, without_later_options
from quant.sft_data import Windows

STATE = "state.pt"


@dataclass
class TrainConfig:
    steps: int = 400
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    micro_batch: int = 4  # sequences per forward, per process
    grad_accum: int = 2  # forwards per optimizer step, per process
    max_grad_norm: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    checkpoint_every: int = 50
    autocast: bool | None = None  # None: bf16 autocast where the device multiplies bf16 (quant.method.native_bf16)
    recompute_activations: bool = True  # activation checkpointing per block: less memory, ~1/3 more compute
    optimizer_state: str = "fp32"  # AdamW's moments: fp32, or bf16 (quant/optim.py: 4 bytes a parameter less)
    scale_lr: float = 0.0  # the learning rate of train()'s step_sizes (quant.qat's learned group scales)
    seed: int = 0

    def fingerprint(self) -> str:
        # How often to checkpoint and whether activations are recomputed do not change the result,
        # so a run may resume with other values.
        d = {k: v for k, v in asdict(self).items() if k not in ("checkpoint_every", "recompute_activations")}
        d = without_later_options(d, {"optimizer_state": "fp32", "scale_lr": 0.0})
        if d["autocast"] is False:  # what None meant on a CPU before the choice was made per device
            d["autocast"] = None
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --- processes and devices ---------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Joins the process group torchrun describes in the environment; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return d


def process_device(device: str, d: Dist) -> torch.device:
    """This process's device: --device (quant.method.resolve_device), on a GPU the process's own."""
    if resolve_device(device).startswith("cuda"):
        return torch.device("cuda", d.local_rank if d.world > 1 else torch.cuda.current_device())
    return torch.device("cpu")


def use_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.autocast is not None:
        return cfg.autocast
    return native_bf16(str(device))


# --- batches -----------------------------------------------------------------------------------


def sample_index(k: int, n: int, seed: int) -> int:
    """The k-th training sample: epoch after epoch, each a fresh permutation of the n windows."""
    epoch, i = divmod(k, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return int(perm[i])


def micro_batch_ids(n: int, step: int, a: int, cfg: TrainConfig, d: Dist) -> list[int]:
    """The samples of micro-batch a of this process at `step`. Every step consumes
    world * grad_accum micro-batches; process r takes those numbered r, r + world, ..., so
    2 processes x accum 1 see exactly what 1 process x accum 2 sees."""
    j = step * d.world * cfg.grad_accum + a * d.world + d.rank
    return [sample_index(j * cfg.micro_batch + b, n, cfg.seed) for b in range(cfg.micro_batch)]


def micro_batch(windows: Windows, step: int, a: int, cfg: TrainConfig, d: Dist):
    ids = micro_batch_ids(len(windows), step, a, cfg, d)
    return windows.tokens[ids], windows.mask[ids]


# --- loss --------------------------------------------------------------------------------------


# Positions per chunk of the distillation loss: its log-softmaxes are [positions, vocabulary] in
# fp32 (49,152 x 4 bytes a position for SmolLM2, 128,256 x 4 for Llama 3), recomputed in the backward.
KD_CHUNK = 256


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, teacher_logits: torch.Tensor | None,
            cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """CE on masked targets + T^2 * KL(teacher || student) on the same positions."""
    sel = logits[mask]
    parts = {}
    loss = torch.zeros((), device=logits.device)
    if cfg.ce_weight:
        ce = F.cross_entropy(sel.float(), targets[mask])
        loss = loss + cfg.ce_weight * ce
        parts["ce"] = ce.detach()
    if teacher_logits is not None and cfg.kd_weight:
        t = cfg.kd_temperature
        teacher_sel = teacher_logits[mask]
        kd = sum(checkpoint(_kl_sum, sel[i:i + KD_CHUNK], teacher_sel[i:i + KD_CHUNK], t, use_reentrant=False)
                 for i in range(0, sel.shape[0], KD_CHUNK)) / sel.shape[0] * t * t
        loss = loss + cfg.kd_weight * kd
        parts["kd"] = kd.detach()
    return loss, parts


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    log_p_t = F.log_softmax(teacher.float() / t, -1)
    log_p_s = F.log_softmax(student.float() / t, -1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module, enabled: bool = True):
    """While inside, each of model.layers keeps only its input for the backward pass and runs its
    forward again there (torch.utils.checkpoint); the module itself and its state dict are unchanged."""
    blocks = list(getattr(model, "layers", [])) if enabled else []
    for b in blocks:
        b.forward = functools.partial(checkpoint, b.forward, use_reentrant=False)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward  # back to the class's forward


# --- checkpoint --------------------------------------------------------------------------------


def _param_names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    ids = {id(p) for p in params}
    names, seen = [], set()
    for name, p in model.named_parameters():  # named_parameters lists a tied weight once
        if id(p) in ids and id(p) not in seen:
            names.append(name)
            seen.add(id(p))
    return names


def save_state(path: Path, model: nn.Module, names: list[str], opt, sched, step: int, fingerprint: str, done: bool):
    from exporter.atomic import atomic_path

    params = dict(model.named_parameters())
    state = {"step": step, "done": done, "fingerprint": fingerprint,
             "params": {n: params[n].detach().cpu() for n in names},
             "optim": opt.state_dict(), "sched": sched.state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# --- the loop ----------------------------------------------------------------------------------


def cosine_schedule(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


Objective = Callable[[nn.Module, int, int], tuple[torch.Tensor, dict, int]]


def train(name: str, model: nn.Module, params: list[nn.Parameter], objective: Objective, cfg: TrainConfig,
          state_path: Path, fingerprint: str, device: torch.device, d: Dist,
          on_step: Callable[[int, dict], None] | None = None, progress: bool = True,
          work_dir: Path | None = None, step_sizes: list[nn.Parameter] = ()) -> dict:
    """Trains `params` of `model` (in place) for cfg.steps steps; resumes from state_path if it
    holds an unfinished run with the same fingerprint, and only restores the parameters if that
    run has finished; a state with another fingerprint is an error naming work_dir (default: the
    state's folder), quant.method's resume policy. `objective(forward, step, a)` returns micro-batch a's (loss, parts, tokens)
    computed through `forward` (the model, or its DDP wrapper). `step_sizes`: those of `params` that are
    quantization step sizes (quant.qat.learned_scales), trained at cfg.scale_lr. Returns the last step's metrics."""
    from exporter.progress import bar as progress_bar

    names = _param_names(model, params)
    trainable = set(id(p) for p in params)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    # Group scales (quant.qat, learn_scales) are step sizes, not weights: their own rate, no decay.
    scale_ids = {id(p) for p in step_sizes}
    if not scale_ids <= trainable:
        raise ValueError("train: step_sizes must be among the trained params")
    decay = [p for p in params if p.dim() >= 2 and id(p) not in scale_ids]
    no_decay = [p for p in params if p.dim() < 2 and id(p) not in scale_ids]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scale_ids:
        groups.append({"params": [p for p in params if id(p) in scale_ids], "weight_decay": 0.0, "lr": cfg.scale_lr})
    if cfg.optimizer_state == "bf16":
        from quant.optim import AdamWBf16State

        opt = AdamWBf16State(groups, lr=cfg.lr, betas=(0.9, 0.95))
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), foreach=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(cfg))

    start = 0
    state = load_state(state_path, fingerprint, work_dir or Path(state_path).parent)
    if state is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["params"].items():
                named[n].copy_(t)
        start = state["step"]
        if state["done"] or start >= cfg.steps:
            return {"step": start, "resumed": True}
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])

    fwd = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = use_autocast(cfg, device)
    model.train()
    bar = progress_bar(total=cfg.steps, initial=start, desc=name, unit="step", disable=not (progress and d.main),
               dynamic_ncols=True)
    metrics: dict = {}
    with torch.enable_grad(), recomputed_blocks(model, cfg.recompute_activations):
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            tokens_seen, parts_sum, loss_sum = 0, {}, 0.0
            for a in range(cfg.grad_accum):
                sync = a == cfg.grad_accum - 1 or d.world == 1
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    with fwd.no_sync() if not sync else contextlib.nullcontext():
                        loss, parts, n_tokens = objective(fwd, step, a)
                        (loss / cfg.grad_accum).backward()
                tokens_seen += n_tokens
                loss_sum += float(loss.detach()) / cfg.grad_accum
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / cfg.grad_accum
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            metrics = {"step": step + 1, "loss": loss_sum, **parts_sum, "lr": sched.get_last_lr()[0],
                       "tok_s": tokens_seen * d.world / dt}
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k != "step"}, refresh=False)
            bar.update(1)
            done = step + 1 == cfg.steps
            if d.main and (done or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
                save_state(state_path, model, names, opt, sched, step + 1, fingerprint, done)
            if on_step is not None:
                on_step(step + 1, metrics)
    bar.close()
    model.eval()
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return metrics


def sft_objective(windows: Windows, cfg: TrainConfig, d: Dist, device: torch.device,
                  teacher: nn.Module | None) -> Objective:
    """Next-token CE on the response targets (+ distillation from `teacher`), one micro-batch."""

    def objective(fwd: nn.Module, step: int, a: int):
        tokens, mask = micro_batch(windows, step, a, cfg, d)
        tokens, mask = tokens.to(device), mask.to(device)
        inp, tgt, m = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
        teacher_logits = None
        if teacher is not None and cfg.kd_weight:
            with torch.no_grad():
                teacher_logits = teacher(inp)
        loss, parts = loss_fn(fwd(inp), tgt, m, teacher_logits, cfg)
        return loss, parts, inp.numel()

    return objective
