"""Cayley SGD on the orthogonal group (Li et al. 2020; the optimizer SpinQuant trains R1, R2 with).

For an orthogonal X with Euclidean gradient G, A = (G X^T - X G^T) / 2 is skew-symmetric and
A X is the Riemannian gradient. The step moves along the Cayley curve
    X <- (I + t/2 A)^-1 (I - t/2 A) X,
which is orthogonal for every t, so X never leaves the manifold. Like SpinQuant's SGDG, the step
is capped at t = 1 / ||A||_1 so large gradients cannot throw X around. The update is solved
exactly (SpinQuant iterates a fixed point five times), in float64, on a float64 master copy that
is orthogonalized once at the start, so orthogonality holds to float64 rounding however many
steps are taken.

Parameters may be batches of square matrices [..., n, n] (one R2 per layer).
"""

from __future__ import annotations

import torch


class CayleySGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1.5, momentum: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "master" not in state:
                    # The start, as given in float32, is orthogonal only to float32 rounding.
                    state["master"] = nearest_orthogonal(p.detach().double())
                x = state["master"]
                g = p.grad.double()
                a = 0.5 * (g @ x.transpose(-1, -2) - x @ g.transpose(-1, -2))
                if group["momentum"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(a))
                    buf.mul_(group["momentum"]).add_(a)
                    a = buf
                norm1 = a.abs().sum(-2).amax(-1)[..., None, None]  # max column sum, per matrix
                t = torch.clamp(1.0 / (norm1 + 1e-8), max=group["lr"])
                eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
                x_new = torch.linalg.solve(eye + 0.5 * t * a, (eye - 0.5 * t * a) @ x)
                state["master"] = x_new
                p.copy_(x_new.to(p.dtype))
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch casts a loaded state to its parameter's dtype; the masters and momenta stay float64.
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(p.device, torch.float64).clone()


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x)
    return u @ vh

