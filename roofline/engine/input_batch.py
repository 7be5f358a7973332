"""InputBatch: the flat tensors and attention metadata of one step, built from a SchedulerOutput."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roofline.engine.kv_cache import KVCacheManager
from roofline.engine.scheduler import ScheduledRequest, SchedulerOutput
from roofline.layers.attention import AttentionMetadata, PrefillChunk


@dataclass
class LogitsRow:
    """A row of the step's logits and what it is for."""

    row: int  # index into the flat batch
    item: ScheduledRequest
    position: int  # absolute position of the token whose output distribution this is
    sample: bool  # the distribution of the next token to generate
    prompt_target: int | None  # prompt token whose logprob this row gives, if any


@dataclass
class InputBatch:
    """Flat inputs of one step; decode tokens first, then prefill chunks."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn: AttentionMetadata
    logits_rows: list[LogitsRow]
    items: list[ScheduledRequest]  # in flat-batch order


def _slots(table: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    blocks = torch.tensor(table[:-(-num_tokens // block_size)], dtype=torch.long)
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:num_tokens]


def build_input_batch(out: SchedulerOutput, kv: KVCacheManager, device: torch.device) -> InputBatch:
    """Flatten the scheduled requests into one batch with its attention metadata."""
    bs = kv.block_size
    is_decode = [s.num_new_tokens == 1 and s.request.num_computed_tokens > 0 for s in out.scheduled]
    items = [s for s, d in zip(out.scheduled, is_decode) if d] + [s for s, d in zip(out.scheduled, is_decode) if not d]
    num_decodes = sum(is_decode)
    ids: list[int] = []
    positions: list[int] = []
    slot_parts: list[torch.Tensor] = []
    logits_rows: list[LogitsRow] = []
    decode_tables: list[torch.Tensor] = []
    prefills: list[PrefillChunk] = []
    for idx, item in enumerate(items):
        r = item.request
        start, end = r.num_computed_tokens, r.num_computed_tokens + item.num_new_tokens
        row0 = len(ids)
        ids.extend(r.all_token_ids[start:end])
        positions.extend(range(start, end))
        context = _slots(kv.block_tables[r.request_id], end, bs)  # [end]
        slot_parts.append(context[start:end])
        if idx < num_decodes:
            decode_tables.append(context)
        else:
            cached = start > 0
            mask = None
            if cached:
                q_pos = torch.arange(start, end)[:, None]
                mask = torch.arange(end)[None, :] <= q_pos  # [L, C]
            prefills.append(PrefillChunk(row0, end - start, end, context.to(device) if cached else None,
                                         mask.to(device) if mask is not None else None))
        if r.wants_prompt_logprobs:
            # row at position p predicts prompt token p + 1; skip positions already reported
            first = max(start, len(r.prompt_logprobs) - 1)
            for p in range(first, min(end, r.num_prompt_tokens - 1)):
                logits_rows.append(LogitsRow(row0 + p - start, item, p, False, r.prompt_token_ids[p + 1]))
        if item.completes_sequence:
            logits_rows.append(LogitsRow(row0 + end - 1 - start, item, end - 1, True, None))
    decode_table = decode_mask = None
    if decode_tables:
        lengths = [t.numel() for t in decode_tables]
        max_len = max(lengths)
        decode_table = torch.zeros(len(decode_tables), max_len, dtype=torch.long)
        for i, t in enumerate(decode_tables):
            decode_table[i, :t.numel()] = t
        if min(lengths) != max_len:
            decode_mask = (torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
            decode_mask = decode_mask.to(device)
        decode_table = decode_table.to(device)
    attn = AttentionMetadata(
        slot_mapping=torch.cat(slot_parts).to(device),
        num_decode_tokens=num_decodes,
        decode_slot_table=decode_table,
        decode_mask=decode_mask,
        prefills=prefills,
    )
    return InputBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        attn=attn,
        logits_rows=logits_rows,
        items=items,
    )
