"""LLM: the offline Python API (`LLM.generate`, `LLM.chat`), in the shape vLLM users know."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from roofline.config import CacheConfig, DeviceConfig, EngineConfig, OffloadConfig, QuantConfig, SchedulerConfig
from roofline.engine.llm_engine import LLMEngine
from roofline.engine.pooling import truncate_embedding
from roofline.errors import InvalidRequestError
from roofline.outputs import RequestOutput
from roofline.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Load a model once, then generate for many prompts at a time."""

    def __init__(self, model: str = "default", dtype: str = "auto", device: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, num_threads: int | None = None,
                 kv_cache_memory: int | None = None, block_size: int = 16, enable_prefix_caching: bool = True,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512, preemption_mode: str = "auto",
                 swap_space: int = 2 << 30, show_progress: bool = False, quantization: str = "auto",
                 quantization_group_size: int = 32, kv_cache_dtype: str = "auto", kernels: str = "auto",
                 kernel_accuracy: str = "bf16", compile: bool = False, enforce_eager: bool = False,
                 max_decode_stall_ms: float | None = 250.0, scheduling: str = "slo",
                 tenant_weights: dict[str, float] | None = None, memory_limit: int | str | None = None,
                 offload: str = "auto", offload_dir: str | None = None) -> None:
        config = EngineConfig(
            model=model,
            device=DeviceConfig(device=device, dtype=dtype, num_threads=num_threads,
                                compile=compile and not enforce_eager),
            cache=CacheConfig(block_size=block_size, memory_bytes=kv_cache_memory,
                              enable_prefix_caching=enable_prefix_caching, swap_space_bytes=swap_space),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len, preemption_mode=preemption_mode,
                                      max_decode_stall_ms=max_decode_stall_ms, scheduling=scheduling,
                                      tenant_weights=dict(tenant_weights or {})),
            quant=QuantConfig(method=quantization, group_size=quantization_group_size,
                              kv_cache_dtype=kv_cache_dtype, kernels=kernels, kernel_accuracy=kernel_accuracy),
            offload=OffloadConfig(memory_limit=parse_memory_limit(memory_limit), offload=offload,
                                  directory=offload_dir),
            seed=seed,
            show_progress=show_progress,
        )
        progress = _tqdm_progress if show_progress else None
        self.engine = LLMEngine(config, progress)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or many (text or token ids); all run through the engine together."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidRequestError("no prompts given")
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        return self._run(prompts, params_list, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if not messages:
            raise InvalidRequestError("no messages given")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt) for c in conversations]
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(ids, sampling_params, use_tqdm)
        for out, text in zip(outputs, prompts):
            out.prompt = text
        return outputs

    def embed(self, inputs: Prompt | Sequence[Prompt], pooling: str | None = None,
              dimensions: int | None = None) -> list[list[float]]:
        """L2-normalized embeddings of texts or token-id lists, in order (docs/api.md, "Embeddings").

        pooling: "last" (the final normed hidden state of the last token) or "mean" (of every token); default
        the model directory's sentence-transformers pooling config, else "last";
        dimensions: keep the first entries and renormalize (at most the hidden size).
        """
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        inputs = list(inputs)
        if not inputs:
            raise InvalidRequestError("no inputs given")
        hidden = self.engine.model_config.hidden_size
        if dimensions is not None and not (isinstance(dimensions, int) and 1 <= dimensions <= hidden):
            raise InvalidRequestError(f"dimensions must be an integer in [1, {hidden}] (the hidden size), "
                                      f"got {dimensions}")
        params = SamplingParams(pooling=pooling or self.engine.default_pooling)
        outputs = self._run(inputs, [params] * len(inputs), False)
        return [truncate_embedding(out.embedding, dimensions) for out in outputs]

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                engine.add_request(rid, prompt, p)
            final: dict[str, RequestOutput] = {}
            bar = _tqdm_bar(len(ids)) if use_tqdm else None
            while len(final) < len(ids):
                for out in engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.close()
        finally:
            engine.abort([rid for rid in ids if rid in engine.groups])
        return [final[rid] for rid in ids]


def parse_memory_limit(limit: int | str | None) -> int | None:
    """An int of bytes or a size string ("600MB", "1.5GiB") as bytes; None stays None."""
    if limit is None or isinstance(limit, int):
        return limit
    from roofline.planner.units import parse_quantity

    return int(parse_quantity(limit, "memory limit"))


def _tqdm_progress(iterable, total: int):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="loading weights", unit="tensor", leave=False)


def _tqdm_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")
