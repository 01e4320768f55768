"""Hadamard matrices of the sizes LLMs have, and the online transform that runs inside the model.

A size n is handled as n = m * 2^k: a small Hadamard matrix of order m (Paley's constructions:
12, 20, 28, 36, 44, ...) Kronecker a Sylvester matrix of order 2^k. SmolLM2's FFN is
1536 = 12 x 128 and its residual 576 = 36 x 16; Llama 3.2's 8192 is a power of two (m = 1).

`OnlineHadamard` applies the orthonormal transform x -> x (H_m (x) H_2^k) / sqrt(n) to the last
dimension. Eagerly it is two small matmuls per factor; when exporting (`use_executorch_ops`) the
power-of-two part is ExecuTorch's llama::fast_hadamard_transform, which computes exactly
x @ H_2^k / sqrt(2^k) in Sylvester order, and the small factor stays a matmul.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import nn


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = legendre(j - i mod q): the core of Paley's constructions (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 mod 4."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, one) + torch.kron(torch.eye(n, dtype=torch.float64), zero)


def sylvester(n: int) -> torch.Tensor:
    """The (unnormalized) Sylvester Hadamard matrix of order n, a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"sylvester: {n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@cache
def _small_orders(limit: int = 256) -> dict[int, tuple[str, int]]:
    """Orders m <= limit that Paley I or II give directly (not powers of two), with how."""
    out = {}
    for q in range(3, limit):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and q + 1 <= limit:
            out.setdefault(q + 1, ("paley1", q))
        if q % 4 == 1 and 2 * (q + 1) <= limit:
            out.setdefault(2 * (q + 1), ("paley2", q))
    return out


def factor(n: int) -> tuple[int, int] | None:
    """n = m * p with p a power of two and m = 1 or a Paley order, m as small as possible; None if none."""
    if n >= 1 and not n & (n - 1):
        return 1, n
    for m in sorted(_small_orders()):
        p = n // m
        if n % m == 0 and not p & (p - 1):
            return m, p
    return None


def small_hadamard(m: int) -> torch.Tensor:
    """The unnormalized Hadamard matrix of a Paley order m (float64), or [[1]] for m = 1."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    how, q = _small_orders()[m]
    return _paley1(q) if how == "paley1" else _paley2(q)


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthonormal n x n matrix (H_m (x) H_p) / sqrt(n) that OnlineHadamard(n) applies (float64)."""
    f = factor(n)
    if f is None:
        raise ValueError(f"no Hadamard construction for size {n} (need m * 2^k with m a Paley order)")
    m, p = f
    return torch.kron(small_hadamard(m), sylvester(p)) / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Hadamard matrix with random column signs (SpinQuant's and QuaRot's initial rotation);
    a random orthogonal matrix when n has no Hadamard construction."""
    if factor(n) is None:
        return random_orthogonal(n, generator)
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs[None, :]


def _split_pow2(p: int) -> tuple[int, int]:
    # Sylvester's H_{2^(a+b)} is exactly H_{2^a} (x) H_{2^b}: two matmuls of size ~sqrt(p)
    # instead of one of size p keep the eager transform cheap for p = 8192 and more.
    a = int(math.log2(p)) // 2
    return 2**a, p // 2**a


class OnlineHadamard(nn.Module):
    """x -> x @ hadamard_matrix(n) on the last dimension, as run inside the model."""

    def __init__(self, n: int):
        super().__init__()
        f = factor(n)
        if f is None:
            raise ValueError(f"no Hadamard construction for size {n}")
        self.n, (self.m, self.p) = n, f
        p1, p2 = _split_pow2(self.p)
        # Non-persistent: they are functions of n, not weights, and stay out of checkpoints.
        self.register_buffer("h_small", (small_hadamard(self.m) / math.sqrt(self.m)).float(), persistent=False)
        self.register_buffer("h_p1", (sylvester(p1) / math.sqrt(p1)).float(), persistent=False)
        self.register_buffer("h_p2", (sylvester(p2) / math.sqrt(p2)).float(), persistent=False)
        self.use_executorch_ops = False  # set by exporter.lower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.use_executorch_ops:
            y = torch.ops.llama.fast_hadamard_transform(x.reshape(*shape[:-1], self.m, self.p).contiguous())
        else:
            p1, p2 = self.h_p1.shape[0], self.h_p2.shape[0]
            y = x.reshape(*shape[:-1], self.m, p1, p2) @ self.h_p2.to(x.dtype)  # Sylvester matrices are symmetric
            y = (self.h_p1.to(x.dtype) @ y).reshape(*shape[:-1], self.m, self.p)
        if self.m > 1:
            # x @ (A (x) B) with x viewed as [m, p] is A^T X B.
            y = self.h_small.t().to(y.dtype) @ y
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return f"n={self.n} ({self.m} x {self.p})"


class HadamardInputLinear(nn.Linear):
    """A linear layer whose input goes through an online Hadamard transform first (SpinQuant's R4).

    Still an nn.Linear with the same name and weight, so the scheme (torchao) quantizes it like
    any other block linear and the activation quantization sees the transformed input.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.hadamard = OnlineHadamard(in_features)

    @classmethod
    def wrap(cls, linear: nn.Linear) -> HadamardInputLinear:
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features)
        new.weight = linear.weight
        new.hadamard = OnlineHadamard(linear.in_features)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.hadamard(x), self.weight)
