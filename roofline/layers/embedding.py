"""Token embedding and the output head (optionally tied to the embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    """Token id -> hidden vector."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, dim]
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    """Hidden vector -> fp32 logits over the vocabulary; a tied head shares the embedding's Parameter."""

    def __init__(self, vocab_size: int, dim: int, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.is_tied = tied_to is not None
        self.weight = tied_to.weight if tied_to is not None else nn.Parameter(
            torch.empty(vocab_size, dim), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, dim] -> [N, vocab]
        return F.linear(hidden, self.weight).float()
