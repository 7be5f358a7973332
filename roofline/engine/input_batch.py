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


def _slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of positions [start, end) given the block table."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def build_input_batch(out: SchedulerOutput, kv: KVCacheManager, device: torch.device) -> InputBatch:
    """Flatten the scheduled requests into one batch with its attention metadata."""
    bs = kv.block_size
    is_decode = [s.num_new_tokens == 1 and s.request.num_computed_tokens > 0 for s in out.scheduled]
    items = [s for s, d in zip(out.scheduled, is_decode) if d] + [s for s, d in zip(out.scheduled, is_decode) if not d]
    num_decodes = sum(is_decode)
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[LogitsRow] = []
    decode_tables: list[list[int]] = []
    decode_lengths: list[int] = []
    prefills: list[PrefillChunk] = []
    for idx, item in enumerate(items):
        r = item.request
        start, end = r.num_computed_tokens, r.num_computed_tokens + item.num_new_tokens
        row0 = len(ids)
        ids.extend(r.all_token_ids[start:end])
        positions.extend(range(start, end))
        table = kv.block_tables[r.request_id][: -(-end // bs)]
        slots.extend(_slots(table, start, end, bs))
        if idx < num_decodes:
            decode_tables.append(table)
            decode_lengths.append(end)
        else:
            block_table = mask = None
            if start > 0:  # part of the context is cached: attend through the block table
                q_pos = torch.arange(start, end)[:, None]
                mask = (torch.arange(len(table) * bs)[None, :] <= q_pos).to(device)  # [L, nb * bs]
                block_table = torch.tensor(table, dtype=torch.long, device=device)
            prefills.append(PrefillChunk(row0, end - start, end, block_table, mask))
        if r.wants_prompt_logprobs:
            # row at position p predicts prompt token p + 1; skip positions already reported
            first = max(start, len(r.prompt_logprobs) - 1)
            for p in range(first, min(end, r.num_prompt_tokens - 1)):
                logits_rows.append(LogitsRow(row0 + p - start, item, p, False, r.prompt_token_ids[p + 1]))
        if item.completes_sequence:
            logits_rows.append(LogitsRow(row0 + end - 1 - start, item, end - 1, True, None))
    decode_table = decode_mask = None
    if decode_tables:
        max_blocks = max(len(t) for t in decode_tables)
        decode_table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables],
                                    dtype=torch.long, device=device)
        if any(n != max_blocks * bs for n in decode_lengths):
            lengths = torch.tensor(decode_lengths)[:, None]
            decode_mask = (torch.arange(max_blocks * bs)[None, :] < lengths)[:, None, None, :].to(device)
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode_tokens=num_decodes,
        decode_block_table=decode_table,
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
