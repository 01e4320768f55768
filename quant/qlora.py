"""qlora: quantization-aware training with LoRA adapters (the recipe of Meta's Llama 3.2
quantized models), ending in the spec'd scheme.

1. QAT: every parameter trains while the model runs fake-quantized exactly as the scheme
   (quant.qat).
2. LoRA: that backbone is frozen (still fake-quantized) and every block linear gets a float
   adapter (rank 16, scale 2.0 by default), trained on the same objective.

The objective says what the method is for:
- without --data (the default): distillation only, KL from the BF16 model's next-token
  distribution, on text the BF16 model writes itself (data-free, as LLM-QAT). The quantized model
  is pulled toward the model it replaces, on no particular domain: this is recovery, judged by its
  KL to BF16 on text it never saw.
- train_text=mixed (no --data): the same distillation on the model's own text alternating with as many
  windows of the calibration text (WikiText-2's validation split, a common calibration file). On
  SmolLM2 at the cpu budget its .pte is far closer to BF16 on WikiText-2's test split (KL 0.085 against
  0.108) and a little further on the docstrings (0.086 against 0.080), level on licence texts by KL and
  further by perplexity (docs/qlora.md): it helps text like the calibration text, so it is an option.
- with --data FILE (the user's own chat/SFT data or text): cross-entropy on its targets plus the
  same distillation. That is fine-tuning toward the data, not only recovery; ce_weight=0 turns it
  back into distillation on that data.

The start (rotation=learned, the default): the training starts from SpinQuant's outlier-free
weights instead of the checkpoint's: R1/R2 learned as spinquant learns them (Cayley SGD, its preset for the
device) on the training windows, merged, R4 online, then GPTQ on 256 of those windows with spinquant's
asymmetric calibration and scale search (quant.spinquant.learned_gptq); QAT starts from GPTQ's group
scales (quant.qat). On the model's own text the rotations' next-token loss is the KL to the model plus a
constant. On SmolLM2-135M at the cpu budget this start, trained, ended at KL 0.090 (WikiText-2), 0.067
(Python docs) and 0.121 (licence texts) from BF16, closer than spinquant (0.095, 0.068, 0.125) and than the
previous default, a random Hadamard start with plain GPTQ on 64 windows (rotation=hadamard gptq_samples=64
gptq_scale_search=false gptq_asymmetric=false: 0.112, 0.082, 0.140), which took 25 minutes less on 2 cores
(docs/qlora.md). rotation=none starts from the checkpoint's own weights (far from BF16 after the same
training: KL 0.226 against 0.136 from the Hadamard start at a smaller budget).
QAT also trains the block linears' group scales (scale_lr, 1e-5 by default; 0 keeps GPTQ's): from GPTQ's
start no weight step at lr 1e-4 changes an integer, while a scale moves its whole group. On SmolLM2 at the
cpu budget, the learned scales and the adapters at lr 1e-4 end closer to BF16 on both texts than fixed
scales and adapters at 1e-3 (KL 0.109 against 0.120 on WikiText-2, 0.081 against 0.087 on the
docstrings); 3e-5 and 1e-4 for the scales moved the model away (docs/qlora.md).
3. DPO (off unless preference data is given): backbone and adapters together (quant.dpo).

Then the fake quantizers come off and quant.ptq.apply_scheme quantizes the trained base
weights with the same torchao primitives; the adapters stay float and lower to their own fp32
GEMMs beside the 8da4w ones. The trained float weights and adapters are saved under
inputs.work_dir/trained (safetensors) so lowering can be rerun without training, and every round
checkpoints under inputs.work_dir so an interrupted run resumes where it stopped.

Settings come from MethodInputs (steps, device, calibration = the data file, seed) and
inputs.options, whose keys are the fields of QLoRASettings plus `preset`:
  paper (default with --device cuda)  400 QAT steps of 8 x 512 tokens (1.6M), 100 LoRA steps
  cpu   (default otherwise)           50 QAT steps (205K tokens), 20 LoRA steps at lr 1e-4:
                                      SmolLM2-135M's QAT runs at 119 tokens/s on 2 avx512_bf16 cores
                                      (bf16 autocast; 86 in fp32)
--steps N sets both rounds' steps. qat_steps=0 skips round 1 (adapters on the start: GPTQ's rotated
backbone, or round to nearest with rotation=none).

Memory: full-parameter AdamW keeps gradients and two moments, three more fp32 copies of the weights
(1.24B x 4 B x 3 = 14.9 GB for Llama 3.2 1B), which a 24 GB machine cannot hold beside the model and its
teacher. optimizer_state=bf16 keeps the moments in bf16 (quant/optim.py, 4.9 GB less for 1B), and the
teacher holds its bf16-exact block linears in bf16 (store_in_bf16_where_exact, 1.9 GB less for 1B).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from exporter.errors import PtekitError
from exporter.manifest import file_sha256
from exporter.memory import RUNTIME_FLOOR, Need
from quant import data, lora, qat, scheme, sft_data
from quant.gptq import calibration_bytes
from quant.method import (
    MethodInputs,
    check_fingerprint,
    native_bf16,
    option_values,
    pop_preset,
    unreadable_work,
    weights_hash,
)
from quant.train import Dist, TrainConfig, init_distributed, process_device, sft_objective, train

TRAINED = "trained"


@dataclass
class QLoRASettings:
    rank: int = lora.DEFAULT_RANK
    scale: float = lora.DEFAULT_SCALE
    qat_steps: int = 400  # 400 x 8 x 512 = 1.6M tokens
    lora_steps: int = 100  # 0: QAT alone, no adapters
    # From GPTQ's start, 3e-4 ended further from BF16 on three unseen texts and 1e-3 diverged (docs/qlora.md).
    lr: float = 1e-4
    scale_lr: float = 1e-5  # QAT trains the block linears' group scales too, at this rate (quant.qat); 0: fixed
    lora_lr: float = 2e-4
    seq_len: int = 512
    micro_batch: int = 4
    grad_accum: int = 2
    warmup_steps: int = 10
    ce_weight: float | None = None  # None: 0 (distillation only) without --data, 1 with it
    kd_weight: float = 1.0  # distillation from the BF16 model's logits; 0 turns it off
    # learned: start from rotations learned as spinquant learns them, on the training windows, + GPTQ;
    # hadamard: from random Hadamard rotations + GPTQ; none: from the checkpoint. The four start options'
    # defaults are spinquant's cpu preset's: on SmolLM2 that start, trained, ended closer to BF16 than
    # spinquant on three unseen texts, and the Hadamard one's further (docs/qlora.md).
    rotation: str = "learned"
    gptq_samples: int = 256  # rotation=hadamard|learned: training windows GPTQ calibrates on
    gptq_scale_search: bool = True  # rotation=hadamard|learned: GPTQ's group scales by quant.gptq.searched_group_scales
    gptq_asymmetric: bool = True  # rotation=hadamard|learned: GPTQ fits the float model's outputs (quant.gptq)
    checkpoint_every: int = 50
    # bf16 autocast in training. None: where the device multiplies bf16 (quant.method.native_bf16); on a
    # 2-core avx512_bf16 CPU SmolLM2's QAT ran at 119.2 tokens/s against 86.5 in fp32 and ended at the same
    # KL to BF16 (docs/qlora.md).
    autocast: bool | None = None
    recompute_activations: bool = True  # recompute each block's activations in the backward: less memory
    optimizer_state: str = "fp32"  # AdamW's moments in fp32, or bf16 (4 bytes a parameter less: quant/optim.py)
    gen_sequences: int = 256  # data-free: how many sequences the BF16 model writes
    # Without --data: "generated" trains on the model's own text alone; "mixed" interleaves as many windows of
    # the calibration text (WikiText-2's validation split) with it, distilled the same way (no cross-entropy).
    # mixed moved SmolLM2 toward BF16 on WikiText-2 and away on the docstrings (docs/qlora.md).
    train_text: str = "generated"
    dpo_data: str | None = None  # JSONL of {"prompt", "chosen", "rejected"}; None: no DPO round
    dpo_steps: int = 50
    dpo_lr: float = 5e-6
    dpo_beta: float = 0.1
    progress: bool = True

    @classmethod
    def from_inputs(cls, inputs: MethodInputs) -> QLoRASettings:
        opts = dict(inputs.options)
        values = dict(pop_preset("qlora", opts, inputs.device, PRESETS))
        if inputs.steps is not None:
            values["qat_steps"] = values["lora_steps"] = inputs.steps
        values.update(option_values("qlora", cls, opts))
        s = cls(**values)
        for key in ("rank", "seq_len", "micro_batch", "grad_accum"):
            if getattr(s, key) < 1:
                raise PtekitError(f"qlora: {key} must be at least 1 (got {getattr(s, key)})")
        if s.qat_steps < 0 or s.lora_steps < 0:
            raise PtekitError(f"qlora: qat_steps and lora_steps must be 0 or more (got {s.qat_steps}, {s.lora_steps})")
        if s.scale_lr < 0:
            raise PtekitError(f"qlora: scale_lr must be 0 (group scales fixed) or more (got {s.scale_lr})")
        if s.optimizer_state not in ("fp32", "bf16"):
            raise PtekitError(f"qlora: option optimizer_state={s.optimizer_state!r}; choose fp32 or bf16")
        if s.train_text not in ("generated", "mixed"):
            raise PtekitError(f"qlora: option train_text={s.train_text!r}; choose generated or mixed")
        if s.train_text == "mixed" and (src := data_source(inputs)) != sft_data.SELF_GENERATED:
            raise PtekitError(f"qlora: train_text=mixed mixes the model's own text with the calibration text, and "
                              f"--data {src} replaces both; drop one of them")
        if s.rotation not in ("none", "hadamard", "learned"):
            raise PtekitError(f"qlora: option rotation={s.rotation!r}; choose none, hadamard or learned")
        if s.qat_steps == 0 and s.lora_steps == 0:
            raise PtekitError("qlora: qat_steps=0 and lora_steps=0 train nothing; use --method ptq for round to nearest")
        return s

    def round_config(self, name: str, seed: int, user_data: bool) -> TrainConfig:
        """The training settings of round `name` (qat, lora or dpo). Only QAT learns the group scales:
        the adapters and DPO train with the backbone, scales included, frozen."""
        steps, lr, scale_lr = {"qat": (self.qat_steps, self.lr, self.scale_lr),
                               "lora": (self.lora_steps, self.lora_lr, 0.0),
                               "dpo": (self.dpo_steps, self.dpo_lr, 0.0)}[name]
        ce = self.ce_weight if self.ce_weight is not None else (1.0 if user_data else 0.0)
        return TrainConfig(steps=steps, lr=lr, warmup_steps=min(self.warmup_steps, steps // 10),
                           micro_batch=self.micro_batch, grad_accum=self.grad_accum, ce_weight=ce,
                           kd_weight=self.kd_weight, checkpoint_every=self.checkpoint_every,
                           autocast=self.autocast, recompute_activations=self.recompute_activations,
                           optimizer_state=self.optimizer_state, scale_lr=scale_lr, seed=seed)


PRESETS = {
    # 400 x 8 x 512 = 1.6M tokens: where distillation QAT of SmolLM2 recovered 95% of the RTN gap on a GPU.
    "paper": {},
    # 205K tokens (91% there) is what fits an hour of 2 CPU cores.
    # The adapters' rate: at 1e-3 their 20 steps took SmolLM2 away from BF16 on both texts, at 1e-4 a little
    # closer (docs/qlora.md).
    # Micro-batches of 2 x 512 accumulated 4 times: the same 8 x 512 a step; SmolLM2's training then
    # peaks at 6.1 GiB instead of 7.6 GiB for 4 x 512, about 5% slower (docs/qlora.md, Memory).
    "cpu": {"qat_steps": 50, "lora_steps": 20, "lora_lr": 1e-4, "micro_batch": 2, "grad_accum": 4},
}


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- data --------------------------------------------------------------------------------------


def data_source(inputs: MethodInputs) -> Path | str:
    """The file to train on, or SELF_GENERATED (the default: the BF16 model's own text, so the
    training narrows the model to no domain and a bare checkpoint is enough)."""
    src = inputs.calibration
    if src is None or (str(src) == sft_data.SELF_GENERATED and not Path(src).exists()):
        return sft_data.SELF_GENERATED
    return Path(src)


def data_id(src, s: QLoRASettings, seed: int) -> str:
    if src == sft_data.SELF_GENERATED:
        return _hash("self", s.gen_sequences, s.seq_len, seed, "one window a sequence",
                     *([s.train_text] if s.train_text != "generated" else []))
    p = Path(src)
    if not p.is_file():
        raise PtekitError(f"{p}: training data file not found; pass an existing file with --data, or --data self")
    return file_sha256(p)[:16]


def training_windows(src, inputs: MethodInputs, s: QLoRASettings, seq_len: int, teacher: nn.Module,
                     device: torch.device, d: Dist, weights: str) -> sft_data.Windows:
    if src == sft_data.SELF_GENERATED:
        def text():
            return sft_data.own_text(teacher.to(device), inputs.tokenizer, s.gen_sequences, seq_len + 1, inputs.seed,
                                     sft_data.own_text_dir(), weights, progress=s.progress)

        if d.main:  # the main process writes the text; the others read it after the barrier
            text()
        if d.world > 1:
            import torch.distributed as dist

            dist.barrier()
        # One window per sequence as the model wrote it (each is seq_len + 1 tokens), not packed end to end:
        # no window joins the end of one sequence to the random first token of the next, and the start's
        # rotations and GPTQ see exactly spinquant's windows (each sequence's first seq_len tokens).
        tokens = torch.tensor([e.tokens for e in text()])
        windows = sft_data.Windows(tokens, torch.ones_like(tokens, dtype=torch.bool))
        if s.train_text == "mixed":
            windows = _with_calibration_text(windows, inputs)
        source = "self-generated data"
    else:
        if inputs.tokenizer is None:
            raise PtekitError(f"{src}: reading training data needs the checkpoint's tokenizer")
        windows = sft_data.pack(sft_data.load_examples(src, inputs.tokenizer), seq_len, str(src))
        source = str(src)
    sft_data.check_vocab(windows, teacher.config.vocab_size, source)
    return windows


def _with_calibration_text(generated: sft_data.Windows, inputs: MethodInputs) -> sft_data.Windows:
    """train_text=mixed: the generated windows alternating with as many windows of the calibration text, so
    that GPTQ's first windows and every batch hold both."""
    text = data.default_calibration()
    n, width = generated.tokens.shape
    pool = data.windows(data.token_stream(text, inputs.tokenizer), width, inputs.seed, at_least=n, source=text)[:n]
    tokens = torch.stack([generated.tokens, pool], 1).flatten(0, 1)
    return sft_data.Windows(tokens, torch.ones_like(tokens, dtype=torch.bool))


# --- the trained checkpoint --------------------------------------------------------------------


def save_trained(d: Path, model: nn.Module, meta: dict) -> None:
    """The trained model, still fake-quantized (float backbone after QAT, its fixed group scales,
    the adapters) as safetensors, plus how to rebuild it (qlora.json)."""
    from safetensors.torch import save_file

    from exporter.atomic import atomic_dir

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.output.weight is model.tok_embeddings.weight:
        sd.pop("output.weight")  # safetensors stores no aliases; the tie is in qlora.json
    with atomic_dir(d) as tmp:
        save_file(sd, tmp / "model.safetensors")
        (tmp / "qlora.json").write_text(json.dumps(meta, indent=2))


def load_trained(d: Path, model: nn.Module, fingerprint: str, work_dir: Path | None = None) -> bool:
    """Rebuilds the trained, fake-quantized model on `model` (in place) when d holds the result of
    these settings; False when d holds none. A result of other settings is an error naming
    work_dir (default: d's folder), quant.method's resume policy."""
    work_dir = work_dir or d.parent
    meta_path = d / "qlora.json"
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise unreadable_work(meta_path, work_dir, type(e).__name__) from None
    # Deleting the result alone keeps the rounds whose fingerprints still match (they are chained).
    check_fingerprint(meta_path, meta.get("fingerprint"), fingerprint, work_dir,
                      keep=f"delete only {d} to keep the training rounds whose settings did not change")
    from safetensors.torch import load_file

    if meta.get("rotation", "none") != "none":
        from quant.spinquant import rotated_structure

        rotated_structure(model)
    qat.prepare(model)  # the fixed scales come from the file
    if meta["lora"]:
        lora.add_lora(model, meta["lora"]["rank"], meta["lora"]["scale"])
    sd = load_file(d / "model.safetensors")
    tied = model.output.weight is model.tok_embeddings.weight
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not (tied and k == "output.weight")]:
        raise PtekitError(f"{d}: the saved trained weights do not fit this model; delete {d} to train again")
    return True


# --- the method --------------------------------------------------------------------------------


def quantize(model: nn.Module, inputs: MethodInputs) -> nn.Module:
    from quant.ptq import apply_scheme

    s = QLoRASettings.from_inputs(inputs)
    model = model.float()  # trained and distilled in fp32, whatever the checkpoint stores
    work = Path(inputs.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    d = init_distributed(inputs.device)
    device = process_device(inputs.device, d)
    if s.autocast is None:  # decided for this device here, so that the rounds' fingerprints record it
        s = dataclasses.replace(s, autocast=native_bf16(str(device)))
    seq_len = min(s.seq_len, model.config.max_seq_len)
    src = data_source(inputs)

    # One fingerprint per round, chained: a round's checkpoint is reused only by a run that
    # would have produced it (same weights, data and settings up to that round).
    weights = weights_hash(model)
    fp_data = _hash(weights, data_id(src, s, inputs.seed), seq_len)
    # GPTQ's options that came after starts were saved name themselves only when on, so those starts keep
    # their fingerprint.
    gptq_on = [name for name, on in (("scale_search", s.gptq_scale_search), ("asymmetric", s.gptq_asymmetric)) if on]
    fp_start = _hash(fp_data, s.rotation, *((s.gptq_samples, *gptq_on) if s.rotation != "none" else (None,)))
    user_data = src != sft_data.SELF_GENERATED
    names = ["qat"] + (["lora"] if s.lora_steps > 0 else []) + (["dpo"] if s.dpo_data else [])
    rounds = [(name, s.round_config(name, inputs.seed, user_data)) for name in names]
    fps, prev = {}, fp_start
    for name, cfg in rounds:
        extra = (s.rank, s.scale) if name == "lora" else (data_id(s.dpo_data, s, 0), s.dpo_beta) if name == "dpo" else ()
        fps[name] = prev = _hash(prev, name, cfg.fingerprint(), extra)

    meta = {"fingerprint": prev, "lora": {"rank": s.rank, "scale": s.scale} if s.lora_steps > 0 else None,
            "rounds": {name: dataclasses.asdict(cfg) for name, cfg in rounds},
            "data": str(src), "seq_len": seq_len, "rotation": s.rotation}
    if load_trained(work / TRAINED, model, prev, work):
        _leave_if_helper(d)
        return apply_scheme(lora.fold_scales(model), qat.convert(model))

    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    windows = training_windows(src, inputs, s, seq_len, teacher, device, d, weights)
    store_in_bf16_where_exact(teacher)  # after the generation, which would upcast every weight every token
    model.to(device)
    teacher.to(device)

    scales = None
    if s.rotation != "none":
        from quant.spinquant import hadamard_gptq, learned_gptq

        # Deterministic (seed, windows, the saved rotations), so a resumed run rebuilds the same start
        # before loading its state.
        if s.rotation == "hadamard":
            gptq = hadamard_gptq(model, windows.tokens[: s.gptq_samples, :seq_len], inputs.seed, str(device),
                                 progress=s.progress, scale_search=s.gptq_scale_search,
                                 asymmetric=s.gptq_asymmetric)
        else:
            gptq = learned_gptq(model, windows.tokens[:, :seq_len], s.gptq_samples, inputs.seed, str(device),
                                progress=s.progress,
                                scale_search=s.gptq_scale_search, asymmetric=s.gptq_asymmetric)
        scales = {name: scale for name, (_, scale) in gptq.items()}
    qat.prepare(model, scales, learn_scales=s.scale_lr > 0 and s.qat_steps > 0)
    cfg = dict(rounds)["qat"]
    kd_teacher = teacher if s.kd_weight else None
    if s.qat_steps > 0:  # 0: the adapters learn on the start as it is (GPTQ's, or round to nearest with rotation=none)
        train("round 1: QAT", model, list(model.parameters()), sft_objective(windows, cfg, d, device, kd_teacher),
              cfg, work / "qat" / "state.pt", fps["qat"], device, d, progress=s.progress,
              work_dir=work, step_sizes=qat.learned_scales(model))

    if s.lora_steps > 0:
        torch.manual_seed(inputs.seed)  # the adapters' initial values, the same on every process
        lora.add_lora(model, s.rank, s.scale)
        model.to(device)
        cfg = dict(rounds)["lora"]
        train("round 2: LoRA", model, lora.lora_parameters(model), sft_objective(windows, cfg, d, device, kd_teacher),
              cfg, work / "lora" / "state.pt", fps["lora"], device, d, progress=s.progress,
              work_dir=work)

    if s.dpo_data:
        from quant import dpo

        del teacher
        cfg = dict(rounds)["dpo"]
        pairs = sft_data.load_preferences(Path(s.dpo_data), inputs.tokenizer)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        # Backbone and adapters; the group scales stay as QAT left them (the DPO round has no rate for them).
        fixed = {id(p) for p in qat.learned_scales(model)}
        train("round 3: DPO", model, [p for p in model.parameters() if id(p) not in fixed],
              dpo.objective(pairs, reference, cfg, d, device, s.dpo_beta, seq_len), cfg,
              work / "dpo" / "state.pt", fps["dpo"], device, d, progress=s.progress,
              work_dir=work)

    model.to("cpu")
    if d.main:
        save_trained(work / TRAINED, model, meta)
    _leave_if_helper(d)
    return apply_scheme(lora.fold_scales(model), qat.convert(model))


class _Upcast(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.float()


def store_in_bf16_where_exact(model: nn.Module) -> int:
    """Stores in bf16 each linear weight of `model` (the frozen teacher) that bf16 holds exactly, read back
    as fp32 on every use: the forward computes what it computed before, and a BF16 checkpoint's teacher
    takes less memory (1.9 GB less for Llama 3.2 1B: its block linears; 212 MB for SmolLM2-135M, whose GGUF
    dequantizes most block linears to bf16-exact values). Weights that bf16 would round and weights shared
    between modules (a tied classifier) stay fp32.
    Returns the bytes saved."""
    from torch.nn.utils import parametrize

    uses: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    saved = 0
    for mod in list(model.modules()):
        if not isinstance(mod, nn.Linear) or uses[id(mod.weight)] > 1 or mod.weight.dtype != torch.float32:
            continue
        w = mod.weight.detach()
        low = w.to(torch.bfloat16)
        if not torch.equal(low.float(), w):
            continue
        mod.weight = nn.Parameter(low, requires_grad=False)
        parametrize.register_parametrization(mod, "weight", _Upcast(), unsafe=True)
        saved += w.numel() * 2
    return saved


def _leave_if_helper(d: Dist) -> None:
    """Under torchrun only process 0 lowers and writes the .pte; the others are done."""
    if d.world == 1:
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    if not d.main:
        raise SystemExit(0)


def memory_need(cfg, parameters: int, inputs: MethodInputs) -> Need:
    """The training's peak, estimated from the shape (exporter/memory.py): the student and the BF16 teacher in
    fp32 (8 bytes a parameter; a BF16 checkpoint's teacher takes less, store_in_bf16_where_exact); the QAT
    round's gradients and AdamW's two moments (12 more, 8 with optimizer_state=bf16), and with scale_lr > 0 the
    learned group scales with theirs (16 bytes a group of 32 weights, counted over every parameter); and the logits of a
    micro-batch, the student's, their gradient and the teacher's (3 vocabulary-wide fp32 rows per token; the
    distillation itself runs in chunks of positions). On the Llama 3.2 1B shape with optimizer_state=bf16
    and micro-batches of 2 x 512 this gives 21.2 GiB (20.6 with the scales fixed) against a peak of 18.1 GiB
    measured with the scales fixed for `ptekit eval`, which also holds the BF16 reference (docs/qlora.md).
    With rotation=learned the rotation training comes first: the teacher beside the student and the folded and
    rotated copies spinquant makes of each weight (7 bytes a parameter, quant.spinquant.memory_need), which is
    the peak when the QAT round is off, unless GPTQ's calibration hidden states beside both models are larger
    (quant.spinquant.memory_need counts them the same way)."""
    s = QLoRASettings.from_inputs(inputs)
    per_parameter = 8 + ((12 if s.optimizer_state == "fp32" else 8) if s.qat_steps > 0 else 0)
    if s.qat_steps > 0 and s.scale_lr > 0:
        per_parameter += 16 / scheme.GROUP_SIZE  # fp32 scale, gradient, two moments
    if s.rotation == "learned":
        per_parameter = max(per_parameter, 4 + 7)
    # GPTQ's calibration hidden states beside the student and the teacher
    gptq = 0 if s.rotation == "none" else \
        8 * parameters + calibration_bytes(s.gptq_samples, s.seq_len, cfg.dim, s.gptq_asymmetric)
    logits = 3 * 4 * s.micro_batch * s.seq_len * cfg.vocab_size
    if s.qat_steps > 0:
        lower_it = ("-O optimizer_state=bf16 (AdamW's moments in bf16) or " if s.optimizer_state == "fp32" else "") \
            + "-O qat_steps=0 (adapters only, no AdamW state for the backbone)"
    else:
        lower_it = "-O micro_batch=1 (fewer logits at once)" if s.micro_batch > 1 else ""
    return Need("quantize (qlora)", max(int(per_parameter * parameters) + logits, gptq) + RUNTIME_FLOOR, lower_it)
