"""LLMEngine: add_request / step / abort over the scheduler, KV cache manager and model runner."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace

import psutil
import torch

from roofline.config import EngineConfig
from roofline.engine.kv_cache import KVCacheManager
from roofline.engine.model_runner import ModelRunner, configure_threads
from roofline.engine.output_processor import OutputProcessor
from roofline.engine.pooling import configured_pooling
from roofline.engine.request import Request, RequestStatus
from roofline.engine.scheduler import Scheduler, SchedulerOutput
from roofline.engine.structured import GrammarEngine, StructuredRows
from roofline.engine.stats import EngineStats, StepCounters
from roofline.engine.step_model import StepShape, StepTimeModel
from roofline.errors import ContextOverflowError, InvalidRequestError, SLOUnattainableError
from roofline.loaders import open_model
from roofline.outputs import RequestOutput
from roofline.sampling_params import SamplingParams

logger = logging.getLogger("roofline")


def kv_cache_budget(config: EngineConfig, device: torch.device) -> int:
    """Bytes for the KV cache: explicit, or a share of free memory."""
    cache = config.cache
    if cache.memory_bytes is not None:
        return cache.memory_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        activations = total // 20  # headroom for activations and the allocator
        return max(int(total * cache.memory_fraction) - (total - free) - activations, 0)
    return int(psutil.virtual_memory().available * cache.cpu_memory_fraction)


class LLMEngine:
    """The synchronous engine: requests in, RequestOutputs out, one step at a time."""

    def __init__(self, config: EngineConfig, progress=None, source=None) -> None:
        """`source`: a model source object (model_config(), tokenizer(), tensors(dtype), num_tensors()) to
        load instead of opening `config.model`, e.g. random weights of a published shape (bench/gpu.py)."""
        self.config = config
        self.num_threads = configure_threads(config.device.num_threads)
        source = source if source is not None else open_model(config.model)
        self.model_config = source.model_config()
        self.tokenizer = source.tokenizer()
        self.runner = ModelRunner.load(source, config, progress)
        self.grammar = GrammarEngine(self.tokenizer, self.model_config.vocab_size)  # structured outputs
        self.default_pooling = configured_pooling(config.model)  # embeddings that name no pooling
        self.runner.structured = StructuredRows(self.grammar)
        limit = self.model_config.max_position_embeddings
        self.max_model_len = min(config.scheduler.max_model_len or limit, limit)
        bs = config.cache.block_size
        budget = kv_cache_budget(config, self.runner.device)
        block_bytes = bs * self.runner.kv_bytes_per_token
        num_blocks = budget // block_bytes
        if num_blocks * bs < self.max_model_len and config.scheduler.max_model_len is None and num_blocks > 0:
            logger.warning("KV cache holds %d tokens: max_model_len lowered from %d", num_blocks * bs,
                           self.max_model_len)
            self.max_model_len = num_blocks * bs
        if num_blocks * bs < self.max_model_len or num_blocks == 0:
            raise InvalidRequestError(
                f"the KV cache budget ({budget >> 20} MiB) holds {num_blocks * bs} tokens, fewer than one "
                f"sequence of max_model_len={self.max_model_len}; give more KV memory or a smaller max_model_len")
        num_swap = config.cache.swap_space_bytes // block_bytes if self.runner.device.type == "cuda" else \
            min(config.cache.swap_space_bytes // block_bytes, num_blocks)
        self.runner.allocate_kv_cache(num_blocks, bs, num_swap, self.max_model_len, config.scheduler.max_num_seqs)
        if config.device.compile:
            self.runner.enable_compile()
            self.runner.warm_up_compiled()
        self.kv = KVCacheManager(num_blocks, bs, config.cache.enable_prefix_caching, num_swap)
        self.step_model = StepTimeModel()  # fitted to this engine's own steps as they run
        self.scheduler = Scheduler(config.scheduler, self.kv, self._preemption_mode, self.step_model)
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len, self.scheduler.finish)
        self.groups = self.outputs.groups  # user request id -> its samples and outputs
        self._seed_counter = itertools.count()
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self._seconds_per_token: float | None = None  # measured cost of a token in steps that prefill
        self.step_counters = StepCounters()  # step totals and timings, for engine_stats()
        logger.info("model %s: %d parameters, %.1f MiB weights (%s on %s, %d threads)", config.model,
                    self.model_config.num_params, self.runner.weight_bytes / 2**20, self.runner.dtype,
                    self.runner.device, self.num_threads)
        logger.info("KV cache: %d blocks = %d tokens (%.1f MiB)", num_blocks, num_blocks * bs,
                    num_blocks * block_bytes / 2**20)

    # --- preemption cost: bytes to move vs. FLOPs to redo -------------------------------------
    def _preemption_mode(self, request: Request) -> str:
        mode = self.config.scheduler.preemption_mode
        if mode != "auto":
            return mode
        kv_bytes = request.num_computed_tokens * self.runner.kv_bytes_per_token
        if self.runner.device.type == "cuda":
            swap_seconds = 2 * kv_bytes / 20e9  # out and back over PCIe (~20 GB/s effective)
            recompute_seconds = 2 * self.model_config.num_params * request.num_computed_tokens / 200e12
        else:  # swap is a memory copy; recompute is a full prefill at ~100 GFLOP/s
            swap_seconds = 2 * kv_bytes / 5e9
            recompute_seconds = 2 * self.model_config.num_params * request.num_computed_tokens / 100e9
        return "swap" if swap_seconds < recompute_seconds else "recompute"

    # --- requests -------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(prompt text, token ids) for a text or token-id prompt, validated."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        return None, ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, tenant: str | None = None) -> None:
        """Queue a request (text or token ids); raises InvalidRequestError/ContextOverflowError on bad input.

        `tenant` names who sent it (an API key) for fair shares; SLOUnattainableError when its latency
        target cannot be met even on an idle engine ("slo" scheduling).
        """
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        is_embedding = params.pooling is not None  # prefill only: the whole context may be prompt
        if is_embedding and len(ids) > self.max_model_len:
            raise ContextOverflowError(f"the input has {len(ids)} tokens but the context limit is "
                                       f"{self.max_model_len}")
        if not is_embedding and len(ids) >= self.max_model_len:
            raise ContextOverflowError(f"the prompt has {len(ids)} tokens but the context limit is "
                                       f"{self.max_model_len} (prompt + at least one generated token)")
        room = self.max_model_len - len(ids)
        if not is_embedding and params.max_tokens is not None and params.max_tokens > room:
            raise ContextOverflowError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context limit "
                f"of {self.max_model_len} tokens")
        if params.structured is not None:  # a bad schema or grammar is refused before anything is queued
            self.grammar.compile(params.structured)
        max_tokens = 1 if is_embedding else params.max_tokens or room
        if params.slo is not None and self.scheduler.is_slo:
            reason = self.scheduler.unattainable_reason(params, len(ids), max_tokens)
            if reason is not None:
                raise SLOUnattainableError(reason)
        eos = [] if params.ignore_eos else self.tokenizer.eos_token_ids
        samples = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self.config.seed * 1_000_003 + next(
                self._seed_counter)
            gen = torch.Generator(device=self.runner.device)
            gen.manual_seed(seed % (1 << 64))  # any int: torch takes seeds as 64-bit words
            r = Request(f"{request_id}#{i}" if params.n > 1 else request_id, ids, params, max_tokens, eos,
                        priority=priority, generator=gen, sample_index=i,
                        parent_id=request_id if i else None)
            if tenant:
                r.tenant = tenant
            if params.prompt_logprobs is not None:
                r.prompt_logprobs = [None]
            samples.append(r)
        self.outputs.add(request_id, text, ids, samples)
        self.scheduler.add_request(samples[0])
        if params.n > 1:
            self.scheduler.add_children(samples[0], samples[1:])
        self.num_prompt_tokens += len(ids)

    def abort(self, request_ids: str | list[str]) -> None:
        """Stop requests now and free their KV blocks; unknown ids are ignored."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self.outputs.pop(rid)
            if group is None:
                continue
            self.scheduler.pending_children.pop(group.samples[0].request_id, None)
            for r in group.samples:
                if not r.status.is_finished:
                    self.scheduler.finish(r, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.groups)

    # --- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return the outputs of every request that advanced."""
        begun = time.perf_counter()
        plan: SchedulerOutput = self.scheduler.schedule()
        if not plan.scheduled and self.scheduler.num_unfinished:
            # the scheduler guarantees progress (see run_order); an empty plan with work waiting would hang
            # every caller silently, so it fails loudly instead
            raise RuntimeError(f"the scheduler planned nothing while {self.scheduler.num_unfinished} request(s) "
                               f"wait (KV usage {self.kv.usage:.2f}): a scheduler bug")
        shape = StepShape(len(plan.scheduled), plan.num_batched_tokens,
                          sum(item.request.num_computed_tokens for item in plan.scheduled))
        started = time.perf_counter()
        result = self.runner.execute(plan)
        executed = time.perf_counter()
        self._size_prefill_chunks(plan, executed - started)
        sampled_ids = {rid: s.token_id for rid, s in result.sampled.items()}
        self.scheduler.update_from_output(plan, sampled_ids)
        samples = {r.request_id: r for item in plan.scheduled for r in [item.request, *item.fork_children]}
        self.num_generated_tokens += len(result.sampled)
        outputs = self.outputs.process(samples, result.prompt_logprobs, result.sampled)
        if result.pooled:  # embedding requests: finished after their last chunk, with the vector
            outputs += self.outputs.process_pooled(samples, result.pooled)
        self.step_model.observe(shape, time.perf_counter() - begun)  # what a running stream waits per step
        self.step_counters.record(len(plan.scheduled), plan.num_batched_tokens, started - begun, executed - started,
                                  time.perf_counter() - executed)
        return outputs

    def _size_prefill_chunks(self, plan: SchedulerOutput, seconds: float) -> None:
        """Cut prompt chunks, while sequences decode, to what fits in max_decode_stall_ms at the measured cost."""
        stall_ms = self.config.scheduler.max_decode_stall_ms
        num_tokens = plan.num_batched_tokens
        if stall_ms is None or num_tokens < 16:  # a decode-only step says little about the cost of a prompt token
            return
        per_token = seconds / num_tokens  # decodes included: errs towards shorter chunks
        self._seconds_per_token = per_token if self._seconds_per_token is None else \
            0.5 * (self._seconds_per_token + per_token)
        budget = self.config.scheduler.max_num_batched_tokens
        self.scheduler.prefill_chunk_limit = min(budget, max(16, int(stall_ms / 1e3 / self._seconds_per_token)))

    def engine_stats(self) -> EngineStats:
        """A typed snapshot of the queue, batch, KV cache, token totals and step counters (for the dashboard)."""
        running = list(self.scheduler.running)  # a copy: the engine thread may change the list meanwhile
        return EngineStats(
            num_running=len(running), num_waiting=len(self.scheduler.waiting),
            num_kv_blocks_used=self.kv.num_blocks - self.kv.num_free_blocks, num_kv_blocks_total=self.kv.num_blocks,
            prefix_cache_queried_tokens=self.kv.stats.queried_tokens, prefix_cache_hit_tokens=self.kv.stats.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions, num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens, num_context_tokens=sum(r.num_tokens for r in running),
            steps=replace(self.step_counters))

    def stats(self) -> dict[str, float]:
        """Counters for logs and metrics."""
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.kv.usage,
            "prefix_cache_hit_rate": self.kv.stats.hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": self.num_prompt_tokens,
            "generated_tokens": self.num_generated_tokens,
        }
