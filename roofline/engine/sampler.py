"""Sampler: penalties, temperature, top-k/top-p/min-p and seeded sampling, plus raw logprobs.

Logprobs contract: reported logprobs are the log-softmax of the *raw* logits (before penalties,
temperature and truncation). The processed distribution's logprob of the chosen token is
available on request as `processed_logprob`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roofline.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SampledToken:
    """The sampler's result for one row."""

    token_id: int
    logprob: float | None  # raw logprob of the token (when logprobs were asked for)
    rank: int | None  # 1 = most likely under the raw distribution
    top_ids: list[int]  # top-N alternatives under the raw distribution
    top_logprobs: list[float]
    processed_logprob: float | None


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Presence/frequency penalties on generated tokens and repetition penalty on prompt + generated tokens."""
    for i, row in enumerate(rows):
        p = row.params
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
                                dtype=torch.long, device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, outside the top-p nucleus, or below min_p * max prob.

    logits [N, V] (already temperature-scaled); top_k [N] (0 = off); top_p [N]; min_p [N].
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    remove = ranks >= k
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # nucleus: drop a token when the mass before it already reaches top_p (the top token always stays)
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    remove |= probs < min_p[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


class Sampler:
    """Turns a batch of logits rows into tokens and logprobs."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        # logits [N, V] fp32
        want_logprobs = [r.params.logprobs is not None for r in rows]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None
        logits = apply_penalties(logits.clone(), rows)
        temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)
        greedy = temps == 0
        chosen = logits.argmax(dim=-1)
        processed = logits
        if not bool(greedy.all()):
            scaled = logits / torch.where(greedy, 1.0, temps)[:, None]
            top_k = torch.tensor([r.params.top_k for r in rows], device=logits.device)
            top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
            min_p = torch.tensor([r.params.min_p for r in rows], device=logits.device)
            if bool((top_k > 0).any() | (top_p < 1).any() | (min_p > 0).any()):
                scaled = apply_top_k_top_p_min_p(scaled, top_k, top_p, min_p)
            processed = torch.where(greedy[:, None], logits, scaled)
            probs = scaled.softmax(dim=-1)
            # exponential race: argmax(p / E) with E ~ Exp(1) draws from p; per-row generators keep seeds exact
            noise = torch.empty_like(probs)
            for i, row in enumerate(rows):
                noise[i].exponential_(generator=row.generator)
            sampled = (probs / noise).argmax(dim=-1)
            chosen = torch.where(greedy, chosen, sampled)
        chosen_list = chosen.tolist()
        processed_lp = None
        if any(r.params.processed_logprobs for r in rows):
            processed_lp = processed.log_softmax(dim=-1).gather(1, chosen[:, None]).squeeze(1).tolist()
        results = []
        for i, row in enumerate(rows):
            token = chosen_list[i]
            entry = SampledToken(token, None, None, [], [], processed_lp[i] if processed_lp else None)
            if want_logprobs[i]:
                lp_row = raw_logprobs[i]
                entry.logprob = float(lp_row[token])
                entry.rank = int((lp_row > lp_row[token]).sum()) + 1
                n = row.params.logprobs
                if n:
                    values, ids = lp_row.topk(n)
                    entry.top_ids, entry.top_logprobs = ids.tolist(), values.tolist()
            results.append(entry)
        return results


def prompt_logprobs(logits: torch.Tensor, targets: list[int], num_top: list[int]) -> list[SampledToken]:
    """Raw logprob and rank of each target token, with top-N alternatives; logits [N, V] fp32."""
    lps = logits.log_softmax(dim=-1)
    target = torch.tensor(targets, device=logits.device)
    chosen = lps.gather(1, target[:, None]).squeeze(1)
    ranks = ((lps > chosen[:, None]).sum(dim=-1) + 1).tolist()
    chosen = chosen.tolist()
    k = max(num_top, default=0)
    top_vals, top_ids = lps.topk(k) if k else (None, None)
    out = []
    for i, t in enumerate(targets):
        ids = top_ids[i, : num_top[i]].tolist() if k else []
        vals = top_vals[i, : num_top[i]].tolist() if k else []
        out.append(SampledToken(t, chosen[i], ranks[i], ids, vals, None))
    return out
