"""What a .pte of the scheme must weigh, computed from the model's shape, part by part.

Used two ways: to split a measured .pte size into weights, scales and the rest (so a difference from
another file can be named), and to compute the 1B model's size next to Meta's published figures.
Every number here is arithmetic on parameter counts, labelled as computed wherever it is shown.

The storage per part is what ExecuTorch keeps in the file:
- block linears (8da4w g32): XNNPACK's blockwise 4-bit tensors, two weights per byte and one scale
  per group of 32, the scale in bf16 (XNNPACK's qb4w takes bf16 scales; torchao's fp32 scales are
  narrowed when the delegate serializes them). `group_scale_bytes=4` gives the fp32 layout.
- classifier (int8 per channel): int8 weights + one fp32 scale per output row, inside XNNPACK.
- embedding (int8 per channel): int8 rows + an fp32 scale per row, run by ExecuTorch's
  quantized_decomposed.embedding_byte kernel outside the delegate. With tied weights the file holds
  the table twice, once as the embedding and once as the classifier: the kernels want different
  layouts and the .pte format has no aliasing between a delegate's weights and a kernel's.
- bf16 method: every weight in bf16 (2 bytes), the classifier again separately.
- RMSNorm weights and the RoPE cos/sin tables in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.config import ModelConfig

MIB = 2**20


@dataclass
class Parts:
    block_weights: int = 0
    block_scales: int = 0
    embedding: int = 0
    classifier: int = 0
    norms: int = 0
    rope: int = 0
    lora: int = 0

    def total(self) -> int:
        return sum(vars(self).values())

    def as_dict(self) -> dict:
        return {**vars(self), "total": self.total()}


def block_linear_shapes(c: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of the seven linears of one transformer block."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return [(c.dim, q), (c.dim, kv), (c.dim, kv), (q, c.dim), (c.dim, c.hidden_dim), (c.dim, c.hidden_dim),
            (c.hidden_dim, c.dim)]


def block_linear_params(c: ModelConfig) -> int:
    return c.n_layers * sum(i * o for i, o in block_linear_shapes(c))


def lora_params(c: ModelConfig, rank: int) -> int:
    """Adapters A (rank x in) and B (out x rank) on every block linear."""
    return c.n_layers * sum(rank * (i + o) for i, o in block_linear_shapes(c))


def computed_parts(c: ModelConfig, method: str, max_seq_len: int, group_scale_bytes: int = 2,
                   lora_rank: int = 0, lora_bytes: int = 4) -> Parts:
    table = c.vocab_size * c.dim
    p = Parts()
    n_block = block_linear_params(c)
    if method == "bf16":
        p.block_weights = 2 * n_block
        p.embedding = 2 * table
        p.classifier = 2 * table
    else:
        p.block_weights = n_block // 2
        p.block_scales = (n_block // 32) * group_scale_bytes
        p.embedding = table + 4 * c.vocab_size
        p.classifier = table + 4 * c.vocab_size
    p.norms = 4 * c.dim * (2 * c.n_layers + 1)
    p.rope = 2 * 4 * max_seq_len * (c.head_dim // 2)
    if lora_rank:
        p.lora = lora_bytes * lora_params(c, lora_rank)
    return p


def embedding_bytes(c: ModelConfig, method: str) -> int:
    """The embedding table's bytes in the file: read one row per token, so not part of the
    per-token weight traffic."""
    table = c.vocab_size * c.dim
    return 2 * table if method == "bf16" else table + 4 * c.vocab_size


def parameter_count(c: ModelConfig) -> int:
    """Unique parameters (a tied classifier counted once)."""
    table = c.vocab_size * c.dim
    return block_linear_params(c) + table * (1 if c.tie_embeddings else 2) + c.dim * (2 * c.n_layers + 1)
