"""Measure this runtime's eager costs (RuntimeCosts) with its own modules: matmul curves by width
(curves.py), layer dispatch and elementwise work, paged attention, sampling, scheduling.

Every probe runs over data larger than the last-level cache (a model's weights and KV cache are),
keeps the best of several repeats (the run least disturbed by other processes), and fits a fixed
cost plus a per-unit cost from two sizes where a term has both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from roofline.config import SchedulerConfig
from roofline.calibrate.curves import CURVE_WIDTHS, KV_RATIO, intermediate_size, measure_curves
from roofline.planner.eager import RuntimeCosts, activation_elements
from roofline.planner.timing import best_time, fit_line

PROBE_HEAD_DIM = 64
PROBE_WIDTH = 512  # hidden size of the dispatch/elementwise and attention probes
PROBE_LAYERS = 8  # layers the probes cycle through, so KV blocks are not cache-resident
# The probe caches hold this many times the blocks attended, which are picked at random: a running
# engine's blocks lie scattered over a large cache, and gathering them so costs ~1.6x a compact copy.
CACHE_SPREAD = 4
BLOCK_SIZE = 16
DECODE_POINTS = ((1, BLOCK_SIZE + 1), (32, 16 * BLOCK_SIZE + 1))  # (sequences, context) of the attention probe
PREFILL_CHUNKS = (64, 256)  # prompt chunk lengths of the prefill-attention probe
SWEEP_BYTES = 16 << 20  # weight streamed before each stubbed layer, as a layer's matmuls stream theirs
SWEEP_WIDTH = 1024
ELEMENT_TOKENS = (1, 512)  # tokens through the elementwise probe (512: the runtime's default chunk)
SAMPLE_ROWS = (1, 64)
SCHEDULE_ROWS = (1, 64)  # decoding sequences of the scheduling probe
SCHEDULE_BLOCKS = 64  # KV blocks per sequence: room for ~1000 decode steps
PROBE_REPEATS_PER_REPEAT = 6
SAMPLE_VOCAB = 32768


class _NoMatmul(nn.Module):
    """Stands in for a Linear: returns zeros of the output shape, so only the ops around it are timed."""

    def __init__(self, output_sizes: list[int], max_tokens: int, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        self.output_sizes = list(output_sizes)
        self.buffer = torch.zeros(max_tokens, sum(output_sizes), dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.buffer[: x.shape[0]]


class _NoAttention(nn.Module):
    """Stands in for PagedAttention: the queries, flattened."""

    def forward(self, q, k, v, kv_cache, meta) -> torch.Tensor:
        return q.reshape(q.shape[0], -1)


def _probe_config(layers: int):
    from roofline.config import ModelConfig

    heads = PROBE_WIDTH // PROBE_HEAD_DIM
    return ModelConfig(architecture="llama", vocab_size=256, hidden_size=PROBE_WIDTH,
                       intermediate_size=intermediate_size(PROBE_WIDTH), num_layers=layers, num_heads=heads,
                       num_kv_heads=heads // KV_RATIO, head_dim=PROBE_HEAD_DIM, max_position_embeddings=4096)


def measure_elementwise(device: str, dtype: torch.dtype, sync, repeats: int, budget_s: float) -> tuple[float, float]:
    """(dispatch seconds per layer, seconds per activation element): the runtime's decoder layers with
    matmuls and attention stubbed out, at ELEMENT_TOKENS tokens.

    In a model every layer's ops follow matmuls that stream megabytes of weights through the caches,
    which evicts the interpreter's and the dispatcher's working set: measured alone, the same ops
    run ~1.7x faster. So each stubbed layer here follows a GEMV over its own SWEEP_BYTES weight,
    and the GEMVs' time alone is subtracted.
    """
    from roofline.layers.linear import Linear
    from roofline.models.llama import LlamaForCausalLM

    cfg = _probe_config(PROBE_LAYERS)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    max_tokens = max(ELEMENT_TOKENS)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    setattr(parent, name, _NoMatmul(child.output_sizes, max_tokens, dtype, device))
        layer.self_attn.attn = _NoAttention()
    element = torch.finfo(dtype).bits // 8
    sweeps = [torch.full((SWEEP_BYTES // (SWEEP_WIDTH * element), SWEEP_WIDTH), 0.01, dtype=dtype, device=device)
              for _ in range(PROBE_LAYERS)]
    vector = torch.full((1, SWEEP_WIDTH), 0.5, dtype=dtype, device=device)
    times = []
    with torch.inference_mode():
        sweep_s = best_time(lambda: [nn.functional.linear(vector, w) for w in sweeps], sync, repeats, budget_s)
        for tokens in ELEMENT_TOKENS:
            x = torch.full((tokens, PROBE_WIDTH), 0.5, dtype=dtype, device=device)
            rope = model.model.rotary.gather(torch.arange(tokens, device=device), dtype)

            def run(x=x, rope=rope) -> None:
                for layer, weight in zip(model.model.layers, sweeps):
                    nn.functional.linear(vector, weight)
                    layer(x, rope, None, None)

            times.append(max(0.0, best_time(run, sync, repeats, budget_s) - sweep_s) / PROBE_LAYERS)
    elements = activation_elements(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                                   cfg.head_dim)
    dispatch, per_token = fit_line(ELEMENT_TOKENS[0], times[0], ELEMENT_TOKENS[1], times[1])
    return dispatch, per_token / elements


def _attention_inputs(num_seqs: int, context: int, num_new: int, heads: int, kv_heads: int, dtype, device):
    """KV caches for PROBE_LAYERS layers with num_seqs sequences of `context` tokens in scattered blocks,
    their block tables [num_seqs, blocks per sequence], and new q/k/v for num_new tokens per sequence."""
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = CACHE_SPREAD * num_seqs * blocks_per_seq
    shape = (kv_heads, num_blocks, BLOCK_SIZE, PROBE_HEAD_DIM)  # the engine's head-major layout
    caches = [(torch.full(shape, 0.01, dtype=dtype, device=device), torch.full(shape, 0.01, dtype=dtype, device=device))
              for _ in range(PROBE_LAYERS)]
    picked = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))[: num_seqs * blocks_per_seq]
    tables = picked.to(device).view(num_seqs, blocks_per_seq)
    tokens = num_seqs * num_new
    q = torch.full((tokens, heads, PROBE_HEAD_DIM), 0.1, dtype=dtype, device=device)
    k = torch.full((tokens, kv_heads, PROBE_HEAD_DIM), 0.1, dtype=dtype, device=device)
    return caches, tables, q, k, k.clone()


def measure_attention(device: str, dtype: torch.dtype, sync, repeats: int,
                      budget_s: float) -> tuple[float, float, float, float]:
    """(decode fixed s, decode KV bytes/s, prefill fixed s per chunk, prefill s per unit) of the runtime's
    PagedAttention per layer; a prefill unit is one causal query-key pair x query head x head dim."""
    from roofline.layers.attention import AttentionMetadata, PagedAttention, PrefillChunk

    heads = PROBE_WIDTH // PROBE_HEAD_DIM
    kv_heads = heads // KV_RATIO
    attention = PagedAttention(heads, kv_heads, PROBE_HEAD_DIM)
    decode_times, decode_units = [], []
    with torch.inference_mode():
        for num_seqs, context in DECODE_POINTS:
            caches, tables, q, k, v = _attention_inputs(num_seqs, context, 1, heads, kv_heads, dtype, device)
            span = tables.shape[1] * BLOCK_SIZE
            # The last token of each sequence is the new one; the padded tail of its last block is masked.
            slots = tables[:, -1] * BLOCK_SIZE + (context - 1) % BLOCK_SIZE
            mask = (torch.arange(span, device=device)[None, :] < context).expand(num_seqs, span)[:, None, None, :]
            meta = AttentionMetadata(slots, num_seqs, tables, mask.contiguous(), [])
            decode_times.append(best_time(lambda: [attention(q, k, v, kv, meta) for kv in caches], sync,
                                      repeats, budget_s) / PROBE_LAYERS)
            decode_units.append(num_seqs * context * 2 * kv_heads * PROBE_HEAD_DIM * q.element_size())
        prefill_times, prefill_units = [], []
        for length in PREFILL_CHUNKS:
            caches, tables, q, k, v = _attention_inputs(1, length, length, heads, kv_heads, dtype, device)
            slots = (tables[0, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=device)).flatten()[:length]
            meta = AttentionMetadata(slots, 0, None, None,
                                     prefills=[PrefillChunk(0, length, length, None, None)])
            prefill_times.append(best_time(lambda: [attention(q, k, v, kv, meta) for kv in caches], sync,
                                       repeats, budget_s) / PROBE_LAYERS)
            prefill_units.append(length * (length + 1) / 2 * heads * PROBE_HEAD_DIM)
    decode_fixed, decode_s_per_byte = fit_line(decode_units[0], decode_times[0], decode_units[1], decode_times[1])
    prefill = fit_line(prefill_units[0], prefill_times[0], prefill_units[1], prefill_times[1])
    return decode_fixed, 1.0 / max(decode_s_per_byte, 1e-15), *prefill


def measure_sampling(device: str, sync, repeats: int, budget_s: float) -> tuple[float, float]:
    """(seconds per row, seconds per logit) of the runtime's Sampler picking greedy tokens from fp32 logits."""
    from roofline.engine.sampler import Sampler, SamplingRow
    from roofline.sampling_params import SamplingParams

    sampler = Sampler()
    params = SamplingParams(temperature=0.0)
    times = []
    for rows in SAMPLE_ROWS:
        logits = torch.linspace(-5, 5, rows * SAMPLE_VOCAB, device=device).view(rows, SAMPLE_VOCAB)
        sampling_rows = [SamplingRow(params, None, [1, 2, 3], []) for _ in range(rows)]
        times.append(best_time(lambda: sampler(logits.clone(), sampling_rows), sync, repeats, budget_s))
    fixed, per_row = fit_line(SAMPLE_ROWS[0], times[0], SAMPLE_ROWS[1], times[1])
    # Attribute the per-row cost to the vocabulary it scans; the fixed part is one row's bookkeeping.
    return fixed, per_row / SAMPLE_VOCAB


def measure_scheduling(device: str, repeats: int, budget_s: float) -> tuple[float, float]:
    """(seconds per step, seconds per sequence per step) of the engine's own bookkeeping around the model:
    the Scheduler's plan, the input batch and attention metadata it becomes, and the counters' update,
    for SCHEDULE_ROWS decoding sequences (no model runs)."""
    from roofline.config import SchedulerConfig
    from roofline.engine.input_batch import PersistentBatch
    from roofline.engine.kv_cache import KVCacheManager
    from roofline.engine.request import Request
    from roofline.engine.scheduler import Scheduler
    from roofline.sampling_params import SamplingParams

    times = []
    for num_seqs in SCHEDULE_ROWS:
        kv = KVCacheManager(num_seqs * SCHEDULE_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False)
        scheduler = Scheduler(SchedulerConfig(max_num_seqs=max(SCHEDULE_ROWS)), kv)
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        batch = PersistentBatch(BLOCK_SIZE, SCHEDULE_BLOCKS, num_seqs, torch.device(device))
        for i in range(num_seqs):
            scheduler.add_request(Request(f"s{i}", [1 + i % 100] * BLOCK_SIZE, params, 10**6, []))

        def step() -> None:
            plan = scheduler.schedule()
            batch.update(plan)
            batch.prepare(plan)
            sampled = {item.request.request_id: 7 for item in plan.scheduled}
            batch.advance(plan, sampled)
            scheduler.update_from_output(plan, sampled)

        step()  # the prompts' prefill: every later step decodes num_seqs tokens
        times.append(best_time(step, lambda: None, repeats, budget_s))
    return fit_line(SCHEDULE_ROWS[0], times[0], SCHEDULE_ROWS[1], times[1])


def measure_runtime(device: str, dtype: torch.dtype, dtype_name: str, curve_bytes: int, sync,
                    repeats: int, budget_s: float, widths: tuple[int, ...] = CURVE_WIDTHS) -> RuntimeCosts:
    """All of this runtime's eager costs on `device`, activations in `dtype`, curves at `widths`."""
    # Two passes of each curve point: half the repeats per pass.
    layer_curves, head_curves = measure_curves(device, dtype, curve_bytes, sync, max(2, math.ceil(repeats / 2)),
                                               budget_s, widths)
    # The probes below take milliseconds a run: many repeats make their best runs repeatable.
    probe_repeats = PROBE_REPEATS_PER_REPEAT * repeats
    dispatch, element = measure_elementwise(device, dtype, sync, probe_repeats, budget_s)
    decode_fixed, kv_bandwidth, prefill_fixed, prefill_unit = measure_attention(device, dtype, sync,
                                                                              probe_repeats, budget_s)
    row_s, logit_s = measure_sampling(device, sync, probe_repeats, budget_s)
    step_s, sequence_s = measure_scheduling(device, probe_repeats, budget_s)
    return RuntimeCosts(
        dtype=dtype_name, layer_curves=layer_curves, head_curves=head_curves, layer_dispatch_s=dispatch,
        element_s=element, decode_attention_s=decode_fixed, decode_kv_bandwidth=kv_bandwidth,
        prefill_attention_s=prefill_fixed, prefill_attention_unit_s=prefill_unit, sample_row_s=row_s,
        sample_logit_s=logit_s, schedule_step_s=step_s, schedule_sequence_s=sequence_s,
        chunk_tokens=SchedulerConfig().max_num_batched_tokens)
