"""Embeddings as prefill-only requests: pooling the final normed hidden states of a prompt's chunks.

An embedding request (SamplingParams.pooling set) is scheduled and chunked like any prompt, but never
samples: each step the runner pools the rows of its chunk (PoolingChunk -> PooledChunk), the output
processor adds the chunks up (PoolingAccumulator), and the request finishes after its last chunk with
the L2-normalized vector. "last" takes the hidden state of the prompt's last token (the usual rule for
a decoder LM, which sees the whole prompt only there); "mean" averages every position's hidden state.

Prefix caching: the cache holds K/V, not hidden states. "last" is safe with it (the last token is always
computed, and its hidden state depends on the cached K/V only as a fresh prefill's does); "mean" needs
every position, so its requests bypass the prefix cache (Request.skips_prefix_cache), as echo does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("roofline")
POOLING_KINDS = ("last", "mean")
DEFAULT_POOLING = "last"  # decoder LMs without a pooling config: the last token has attended to all the others
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}  # sentence-transformers' names


@dataclass
class PoolingChunk:
    """Where one embedding request's chunk lies in a step's flat batch."""

    request_id: str
    row: int  # first flat row of the chunk
    num_tokens: int
    start: int  # prompt position of the first row
    kind: str  # "last" or "mean"
    is_last: bool  # the chunk ends the prompt


@dataclass
class PooledChunk:
    """One chunk's contribution: the sum of its rows' hidden states (mean), or the last row's (last)."""

    start: int  # prompt position of its first token
    num_tokens: int
    value: torch.Tensor | None  # [hidden] fp32 on the model's device; None for a "last" chunk that is not last
    is_last: bool


def pool_chunks(hidden: torch.Tensor, chunks: list[PoolingChunk]) -> dict[str, PooledChunk]:
    """Pool each chunk's rows of `hidden` ([T, hidden], the final normed states): request id -> PooledChunk."""
    pooled = {}
    for c in chunks:
        if c.kind == "mean":
            value = hidden[c.row:c.row + c.num_tokens].float().sum(dim=0)
        else:
            value = hidden[c.row + c.num_tokens - 1].float().clone() if c.is_last else None
        pooled[c.request_id] = PooledChunk(c.start, c.num_tokens, value, c.is_last)
    return pooled


def configured_pooling(model: str) -> str:
    """The pooling a sentence-transformers model directory declares (modules.json -> Pooling config), else "last"."""
    try:
        with open(os.path.join(model, "modules.json"), encoding="utf-8") as f:
            modules = json.load(f)
        folder = next(m["path"] for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        with open(os.path.join(model, folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return DEFAULT_POOLING  # no such files (a GGUF file, a plain LM) or unreadable ones: the decoder-LM rule
    for key, kind in _ST_MODES.items():
        if isinstance(config, dict) and config.get(key) is True:
            return kind
    logger.warning("the model's pooling config %s names no mode roofline has (last, mean): embeddings use %s",
                   os.path.join(model, folder, "config.json"), DEFAULT_POOLING)
    return DEFAULT_POOLING


def l2_normalize(vector: torch.Tensor) -> torch.Tensor:
    """`vector` / its L2 norm (a zero vector stays zero)."""
    norm = torch.linalg.vector_norm(vector)
    return vector / norm if norm > 0 else vector


class PoolingAccumulator:
    """Adds up one request's pooled chunks; a chunk from position 0 again (recompute after preemption) restarts."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.total: torch.Tensor | None = None  # [hidden] fp32
        self.num_pooled = 0  # prompt positions covered so far

    def add(self, chunk: PooledChunk) -> None:
        """Take one step's chunk."""
        if self.kind == "last":  # only the last chunk counts; earlier ones may have come from the prefix cache
            self.total = chunk.value if chunk.is_last else None
            self.num_pooled = chunk.start + chunk.num_tokens
            return
        if chunk.start == 0:  # the first chunk, or the whole prompt recomputed after a preemption
            self.total, self.num_pooled = None, 0
        if chunk.start != self.num_pooled:
            raise RuntimeError(f"embedding chunk at position {chunk.start} after {self.num_pooled} pooled positions")
        self.total = chunk.value if self.total is None else self.total + chunk.value
        self.num_pooled += chunk.num_tokens

    def vector(self) -> list[float]:
        """The L2-normalized embedding of everything added."""
        if self.total is None or self.num_pooled == 0:
            raise RuntimeError("no hidden states were pooled")
        value = self.total / self.num_pooled if self.kind == "mean" else self.total
        return l2_normalize(value).cpu().tolist()


def truncate_embedding(vector: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` entries renormalized (Matryoshka-style), or the vector itself for None."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    if dimensions < 1:
        raise ValueError(f"dimensions must be >= 1, got {dimensions}")
    return l2_normalize(torch.tensor(vector[:dimensions], dtype=torch.float32)).tolist()
