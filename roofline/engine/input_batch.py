"""The runner's own state: one RequestState per request it holds, persistent input buffers, and the
InputBatch (flat tensors and attention metadata) each step is built into.

The scheduler hands over only what changed (new requests, appended block ids, finished and preempted
ids: see SchedulerOutput); the runner appends the tokens it samples itself, so nothing is rebuilt
from the whole context. Positions, slot mapping and the decode block table come from vectorized
numpy over persistent arrays: the cost of building a step does not grow with context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from roofline.engine.scheduler import SchedulerOutput
from roofline.engine.pooling import PoolingChunk
from roofline.layers.attention import AttentionMetadata, PrefillChunk
from roofline.sampling_params import SamplingParams


@dataclass
class RequestState:
    """What the runner keeps about one request between steps."""

    request_id: str
    token_ids: list[int]  # prompt + generated, appended as tokens are sampled
    num_prompt_tokens: int
    sampling_params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int]
    num_computed_tokens: int
    num_prompt_logprobs_done: int  # prompt positions whose logprobs were already reported
    row: int  # its row in the persistent block table

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True when prompt logprobs were asked for."""
        return self.sampling_params.prompt_logprobs is not None


@dataclass
class LogitsRow:
    """A row of the step's logits and what it is for."""

    row: int  # index into the flat batch
    request_id: str
    sample: bool  # the distribution of the next token to generate
    prompt_target: int | None  # prompt token whose logprob this row gives, if any


@dataclass
class InputBatch:
    """Flat inputs of one step; decode tokens first, then prefill chunks."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn: AttentionMetadata
    logits_rows: list[LogitsRow]
    pooling_chunks: list[PoolingChunk] = field(default_factory=list)  # embedding requests' rows (never sampled)


class PersistentBatch:
    """The runner's requests and the buffers their inputs are written into, updated in place each step."""

    def __init__(self, block_size: int, max_blocks_per_seq: int, max_num_seqs: int, device: torch.device,
                 scratch_block: int | None = None, mask_dtype: torch.dtype | None = None) -> None:
        self.block_size = block_size
        self.device = device
        # decode masks as additive 0 / -inf in this dtype (the queries'): SDPA would otherwise turn a bool
        # mask into that float mask in every layer (two ops per layer per step); None keeps them bool
        self.mask_dtype = mask_dtype
        self.scratch_block = scratch_block  # a KV block no request owns: padding rows of a static step write there
        self.states: dict[str, RequestState] = {}
        # [rows, max_blocks_per_seq] block ids, one row per request held; grown if forks outnumber the rows
        self.block_table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int64)
        self.free_rows = list(range(max_num_seqs))[::-1]

    # --- keeping state ------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput) -> None:
        """Apply the scheduler's hand-off: drop finished and preempted requests, add new ones, append blocks."""
        for rid in [*out.finished_ids, *out.preempted_ids]:
            self.remove(rid)
        for new in out.new_requests:
            self.remove(new.request_id)  # a resumed request is rebuilt from scratch
            state = RequestState(new.request_id, list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
                                 new.generator, [], new.num_computed_tokens, new.num_prompt_logprobs_done,
                                 self._take_row())
            self.states[new.request_id] = state
            self._append_blocks(state, new.block_ids)
        for cached in out.cached_requests:
            state = self.states[cached.request_id]
            state.num_computed_tokens = cached.num_computed_tokens
            self._append_blocks(state, cached.new_block_ids)

    def remove(self, request_id: str) -> None:
        """Forget a request (unknown ids are ignored)."""
        state = self.states.pop(request_id, None)
        if state is not None:
            self.free_rows.append(state.row)

    def fork(self, parent_id: str, child_id: str, params: SamplingParams,
             generator: torch.Generator | None) -> RequestState:
        """A sample branching off the parent's computed prompt; its block ids arrive with the next step."""
        parent = self.states[parent_id]
        child = RequestState(child_id, parent.token_ids[: parent.num_computed_tokens], parent.num_prompt_tokens,
                             params, generator, [], parent.num_computed_tokens, parent.num_prompt_logprobs_done,
                             self._take_row())
        self.states[child_id] = child
        return child

    def _take_row(self) -> int:
        if not self.free_rows:
            rows, width = self.block_table.shape
            self.block_table = np.concatenate([self.block_table, np.zeros((rows, width), dtype=np.int64)])
            self.free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self.free_rows.pop()

    def _append_blocks(self, state: RequestState, block_ids: list[int]) -> None:
        if block_ids:
            start = len(state.block_ids)
            self.block_table[state.row, start:start + len(block_ids)] = block_ids
            state.block_ids.extend(block_ids)

    # --- building a step ----------------------------------------------------------------------------
    @staticmethod
    def _decodes(state: RequestState, num_tokens: int) -> bool:
        """One token after a cached context: a decode, attended in the padded decode batch."""
        return num_tokens == 1 and state.num_computed_tokens > 0

    def is_decode_only(self, out: SchedulerOutput) -> bool:
        """Every scheduled request decodes (an empty step too: it pads to rows of the scratch block only)."""
        return all(self._decodes(self.states[rid], n) for rid, n in out.num_scheduled_tokens.items())

    def prepare(self, out: SchedulerOutput, pad_to: int | None = None) -> InputBatch:
        """The flat batch of this step: decodes first (one token each, context already cached), then prefills.

        pad_to (decode-only steps, with a scratch block): a batch of pad_to rows for a compiled step;
        padding rows decode token 0 at position 0 into the scratch block, and their logits are not read.
        The block table and mask stay as wide as the longest context (a dynamic size when compiled).
        """
        bs = self.block_size
        scheduled = [(self.states[rid], n) for rid, n in out.num_scheduled_tokens.items()]
        is_decode = [self._decodes(s, n) for s, n in scheduled]
        items = [x for x, d in zip(scheduled, is_decode) if d] + [x for x, d in zip(scheduled, is_decode) if not d]
        num_decodes = sum(is_decode)
        counts = np.fromiter((n for _, n in items), dtype=np.int64, count=len(items))
        starts = np.fromiter((s.num_computed_tokens for s, _ in items), dtype=np.int64, count=len(items))
        rows = np.fromiter((s.row for s, _ in items), dtype=np.int64, count=len(items))
        # positions and cache slots of every token, vectorized over the batch
        seq = np.repeat(np.arange(len(items)), counts)  # [T] which item each token belongs to
        offsets = np.cumsum(counts) - counts  # first flat index of each item
        positions = np.arange(int(counts.sum()), dtype=np.int64) - offsets[seq] + starts[seq]
        slots = self.block_table[rows[seq], positions // bs] * bs + positions % bs
        ids: list[int] = []
        logits_rows: list[LogitsRow] = []
        prefills: list[PrefillChunk] = []
        pooling_chunks: list[PoolingChunk] = []
        for idx, (state, n) in enumerate(items):
            start, end, row0 = int(starts[idx]), int(starts[idx]) + n, int(offsets[idx])
            ids.extend(state.token_ids[start:end])
            if idx >= num_decodes:
                block_table = mask = None
                if start > 0:  # part of the context is cached: attend through the block table
                    num_blocks = -(-end // bs)
                    q_pos = torch.arange(start, end)[:, None]
                    mask = (torch.arange(num_blocks * bs)[None, :] <= q_pos).to(self.device)  # [L, nb * bs]
                    block_table = torch.from_numpy(self.block_table[state.row, :num_blocks].copy()).to(self.device)
                prefills.append(PrefillChunk(row0, n, end, block_table, mask))
            if state.wants_prompt_logprobs:
                # row at position p predicts prompt token p + 1; skip positions already reported
                first = max(start, state.num_prompt_logprobs_done)
                for p in range(first, min(end, state.num_prompt_tokens - 1)):
                    logits_rows.append(LogitsRow(row0 + p - start, state.request_id, False, state.token_ids[p + 1]))
            pooling = state.sampling_params.pooling
            if pooling is not None:  # an embedding request: its rows are pooled, nothing is sampled
                pooling_chunks.append(PoolingChunk(state.request_id, row0, n, start, pooling,
                                                   end == state.num_prompt_tokens))
            elif end == len(state.token_ids):
                logits_rows.append(LogitsRow(row0 + n - 1, state.request_id, True, None))
        decode_table = decode_mask = None
        if pad_to is not None:
            if num_decodes != len(items) or pad_to < num_decodes or self.scratch_block is None:
                raise ValueError(f"a static step pads {num_decodes} decodes of {len(items)} rows to {pad_to}")
            pad = pad_to - num_decodes
            ids.extend([0] * pad)
            positions = np.concatenate([positions, np.zeros(pad, dtype=np.int64)])
            slots = np.concatenate([slots, np.full(pad, self.scratch_block * bs, dtype=np.int64)])
            lengths = np.concatenate([starts + 1, np.ones(pad, dtype=np.int64)])
            # at least two blocks wide: a width of 1 would be specialized by torch.compile (a second graph)
            table = np.full((pad_to, max(2, int(-(-lengths.max() // bs)))), self.scratch_block, dtype=np.int64)
            table[:num_decodes] = self.block_table[rows, :table.shape[1]]
            num_decodes = pad_to
        elif num_decodes:
            lengths = starts[:num_decodes] + 1  # context of each decode, its new token included
            table = self.block_table[rows[:num_decodes], :int(-(-lengths.max() // bs))]
        if num_decodes:
            decode_table = torch.from_numpy(table).to(self.device)
            visible = torch.arange(table.shape[1] * bs)[None, :] < torch.from_numpy(lengths)[:, None]
            if self.mask_dtype is not None and pad_to is None:  # eager only: a compiled graph fuses the conversion,
                # and inductor's CPU attention under AVX2 dispatch gave garbage with an additive mask (bool is right)
                visible = torch.zeros(visible.shape, dtype=self.mask_dtype).masked_fill_(~visible, float("-inf"))
            decode_mask = visible[:, None, None, :].to(self.device)  # [B, 1, 1, nb * bs]
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(self.device),
            num_decode_tokens=num_decodes,
            decode_block_table=decode_table,
            decode_mask=decode_mask,
            prefills=prefills,
        )
        return InputBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.from_numpy(positions).to(self.device),
            attn=attn,
            logits_rows=logits_rows,
            pooling_chunks=pooling_chunks,
        )

    def advance(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        """After the step: count the computed tokens and append each sampled token to its request."""
        for rid, n in out.num_scheduled_tokens.items():
            self.states[rid].num_computed_tokens += n
        for rid, token in sampled.items():
            self.states[rid].token_ids.append(token)
