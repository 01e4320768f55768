"""Round three of qlora: direct preference optimization (Rafailov et al. 2023) on
{"prompt", "chosen", "rejected"} pairs, backbone and adapters training together, against a frozen
copy of the model as it left round two.

loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))
with log pi(answer) the summed log-probability of the answer's tokens after the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.sft_data import PreferencePair
from quant.train import Dist, Objective, TrainConfig, micro_batch_ids


def answer_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked targets, per row."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    return (logp * mask).sum(-1)


def pair_batch(pairs: list[PreferencePair], ids: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows chosen_0, rejected_0, chosen_1, ...: prompt + answer, right-padded, answer tokens masked in."""
    rows, masks = [], []
    for i in ids:
        p = pairs[i]
        for answer in (p.chosen, p.rejected):
            toks = (p.prompt + answer)[: max_len + 1]
            rows.append(toks)
            masks.append(([False] * len(p.prompt) + [True] * len(answer))[: len(toks)])
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (t, m) in enumerate(zip(rows, masks)):
        tokens[r, : len(t)] = torch.tensor(t)
        mask[r, : len(m)] = torch.tensor(m)
    return tokens, mask


def objective(pairs: list[PreferencePair], reference: nn.Module, cfg: TrainConfig, d: Dist, device: torch.device,
              beta: float, max_len: int) -> Objective:
    def f(fwd: nn.Module, step: int, a: int):
        tokens, mask = pair_batch(pairs, micro_batch_ids(len(pairs), step, a, cfg, d), max_len)
        tokens, mask = tokens.to(device), mask.to(device)
        inp, tgt, m = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
        policy = answer_logprob(fwd(inp), tgt, m)
        with torch.no_grad():
            ref = answer_logprob(reference(inp), tgt, m)
        margin = beta * ((policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2]))
        loss = -F.logsigmoid(margin).mean()
        return loss, {"margin": margin.detach().mean(), "acc": (margin > 0).float().mean()}, inp.numel()

    return f
