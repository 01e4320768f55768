"""AdamW with its two moments stored in bf16: 4 bytes of optimizer state a parameter instead of 8.

Training every parameter of a 1B model in fp32 holds the weights (4 bytes a parameter), their gradients
(4) and AdamW's two moments (8): 16 bytes a parameter, 19.8 GB for Llama 3.2 1B before the teacher and the
activations. With the moments in bf16 the state is 4.9 GB smaller. Each step reads a moment into fp32,
updates it there and stores it back rounded, so the update itself is computed as torch's AdamW computes
it; what is lost is the moments' precision below bf16's 8 bits of mantissa.

Written here rather than taken from torchao.optim (AdamW8bit, 2 bytes a parameter): torchao's optimizers
compile their update with torch.compile for every parameter shape (on a CPU half a minute for the first
step of a 2-layer model) and keep their state as tensor subclasses that `torch.load(weights_only=True)`
refuses, so a training checkpoint could not be resumed the way every other ptekit checkpoint is.

The update is done a slice of a parameter at a time (CHUNK elements), so its fp32 temporaries stay small
even for a 128K x 2048 embedding.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 22  # 4M elements: 16 MB of fp32 for each temporary


class AdamWBf16State(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def load_state_dict(self, state_dict):
        # torch.optim.Optimizer casts loaded state to its parameter's dtype (fp32); the moments were
        # saved in bf16, so the cast back is exact.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "AdamWBf16State takes no closure"
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                state["step"] += 1
                t = int(state["step"])
                step_size = lr / (1 - b1 ** t)
                bias2_sqrt = (1 - b2 ** t) ** 0.5
                if wd:
                    p.mul_(1 - lr * wd)
                chunks = zip(p.view(-1).split(CHUNK), p.grad.reshape(-1).split(CHUNK),
                             state["exp_avg"].view(-1).split(CHUNK), state["exp_avg_sq"].view(-1).split(CHUNK))
                for w, g, m16, v16 in chunks:
                    g = g.float()
                    m = m16.float().mul_(b1).add_(g, alpha=1 - b1)
                    v = v16.float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    m16.copy_(m)
                    v16.copy_(v)
                    # torch's AdamW: denom = sqrt(v) / sqrt(1 - b2^t) + eps
                    w.addcdiv_(m, v.sqrt_().div_(bias2_sqrt).add_(eps), value=-step_size)
        return None
