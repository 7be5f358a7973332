"""ModelRunner: loads the model, owns the KV cache tensors, runs one step and samples."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from roofline import quant
from roofline.config import EngineConfig, ModelConfig
from roofline.engine.input_batch import PersistentBatch, RequestState
from roofline.engine.pooling import PooledChunk, pool_chunks
from roofline.engine.sampler import SampledToken, Sampler, SamplingRow, prompt_logprobs
from roofline.engine.scheduler import SchedulerOutput
from roofline.engine.structured import StructuredRows
from roofline.errors import ConfigError, ModelLoadError
from roofline.kernels import Accuracy, KernelCache, KernelReport, low_bit_modules, select_kernels
from roofline.models.registry import model_class
from roofline.offload import prepare_offload
from roofline.sampling_params import SamplingParams

logger = logging.getLogger("roofline")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def configure_threads(num_threads: int | None) -> int:
    """Set torch's intra-op thread count: explicit, else $ROOFLINE_NUM_THREADS, $OMP_NUM_THREADS, all usable cores."""
    if num_threads is None:
        env = os.environ.get("ROOFLINE_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        num_threads = int(env) if env and env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))
    torch.set_num_threads(num_threads)
    return num_threads


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool = False) -> torch.Tensor:
    """A zero tensor; on CPU from calloc'd memory, so pages are faulted in (zeroed by the kernel) only when used.

    torch.zeros would write every byte at start-up: seconds for a multi-GiB KV cache.
    """
    if device.type != "cpu" or pin:
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)


def select_model_kernels(model: torch.nn.Module, config: EngineConfig) -> KernelReport | None:
    """Measure (or read from the cache) and install each low-bit layer's kernels; None when there are none."""
    if not low_bit_modules(model):
        return None
    q = config.quant
    report = select_kernels(model, q.kernels, Accuracy.parse(q.kernel_accuracy), KernelCache())
    if report.shapes and not all(s.from_cache for s in report.shapes):
        logger.info("kernels measured for %d layer shapes in %.1f s (cached for the next start)",
                    len(report.shapes), report.probe_seconds)
    return report


def available_host_memory() -> int | None:
    """Bytes the kernel reports as available (MemAvailable), else physical memory; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_build_memory(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before any allocation, a model whose parameters in `dtype` exceed the host's available memory.

    The model is built in `dtype` and quantized layer by layer afterwards, so this is the load's peak.
    """
    need = cfg.num_params * torch.empty((), dtype=dtype).element_size()
    have = available_host_memory() if device.type == "cpu" else None
    if have is not None and need > have:
        raise ModelLoadError(f"the model needs {need / 2**30:.1f} GiB to load ({cfg.num_params / 1e9:.2f}B parameters "
                             f"in {str(dtype).removeprefix('torch.')}); this machine has {have / 2**30:.1f} GiB "
                             f"available")


@dataclass
class ModelRunnerOutput:
    """What one step produced, per request id."""

    sampled: dict[str, SampledToken] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[SampledToken]] = field(default_factory=dict)  # in position order
    pooled: dict[str, PooledChunk] = field(default_factory=dict)  # embedding requests' chunks, pooled


DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PROMPT_LOGPROB_SLICE = 64  # prompt positions whose logits are computed at once


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """The padded decode batch sizes a compiled runner uses: powers of two up to max_num_seqs (and it)."""
    sizes = [b for b in DECODE_BUCKETS if b < max_num_seqs]
    return (*sizes, min(max_num_seqs, DECODE_BUCKETS[-1]))


class ModelRunner:
    """Runs the model over flat batches with a paged KV cache."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, device: torch.device,
                 dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # torch.int8: values and a scale per token and head (quant/kv.py)
        self.sampler = Sampler()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.swap_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.batch: PersistentBatch | None = None  # the runner's own request state, made with the KV cache
        self.kernel_report: KernelReport | None = None  # what the kernel probe measured and chose at load
        self.compiled_forward = None  # torch.compile'd model forward for static decode steps (enable_compile)
        self.decode_buckets: tuple[int, ...] = ()  # batch sizes decode steps are padded to when compiled
        self.structured: StructuredRows | None = None  # grammar matchers of structured samples (set by the engine)
        self.offload_plan = None  # roofline.offload.OffloadPlan: placement and predicted rate, when offloading
        self.streamer = None  # roofline.offload.StreamingExecutor streaming off-device layers, when any

    @classmethod
    def load(cls, source, config: EngineConfig, progress=None) -> "ModelRunner":
        """Build the model for `source` (a GGUF file or HF directory) and fill its weights."""
        device = resolve_device(config.device.device)
        dtype = resolve_dtype(config.device.dtype, device)
        model_config = source.model_config()
        check_build_memory(model_config, dtype, device)
        try:
            with torch.device(device):
                model = model_class(model_config)(model_config).to(dtype)
        except (RuntimeError, MemoryError) as exc:  # the allocator's refusal, as one line
            raise ModelLoadError(f"could not allocate the model ({model_config.num_params / 1e9:.2f}B parameters "
                                 f"in {str(dtype).removeprefix('torch.')}): {str(exc).splitlines()[0]}") from None
        # quantization is planned and applied before loading: low-bit layers are filled directly
        tensor_types = source.tensor_types() if hasattr(source, "tensor_types") else None
        try:
            plan = quant.plan_quantization(model, config.quant.method, config.quant.group_size, tensor_types)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        quant.quantize_model(model, plan)
        tensors = source.tensors(dtype, plan.raw_tensor_names) if plan.raw_tensor_names else source.tensors(dtype)
        if progress is not None:
            tensors = progress(tensors, total=source.num_tensors())
        tensors = ((name, t.to(device) if isinstance(t, torch.Tensor) else t) for name, t in tensors)
        # layers placed off the device are moved to their tier as they fill (docs/offload.md)
        offload_plan, streamer = prepare_offload(model, model_config, source, config, device, dtype, not plan.is_empty)
        routed = quant.route_tensors(model, tensors)
        model.load_weights(streamer.wrap_loading(routed) if streamer is not None else routed)
        quant.finalize_quantized(model)
        if streamer is not None:
            streamer.attach()
        model.eval()
        if not plan.is_empty:
            logger.info("quantization %s: %s", config.quant.method, plan.describe())
        runner_kernels = select_model_kernels(model, config)
        kv_dtype = torch.int8 if config.quant.kv_cache_dtype == "int8" else dtype
        runner = cls(model, model_config, device, dtype, kv_dtype)
        runner.kernel_report = runner_kernels
        runner.offload_plan, runner.streamer = offload_plan, streamer
        return runner

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers."""
        c = self.model_config
        slot = quant.kv_slot_size(c.head_dim, self.kv_dtype)
        return 2 * c.num_layers * c.num_kv_heads * slot * torch.empty((), dtype=self.kv_dtype).element_size()

    @property
    def weight_bytes(self) -> int:
        """Bytes of model weights, quantized ones with their scales (a tied embedding counted once)."""
        return quant.weight_bytes(self.model)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, num_swap_blocks: int, max_model_len: int,
                          max_num_seqs: int) -> None:
        """Preallocate per-layer K/V block tensors on the device, swap space in CPU memory, and the batch state."""
        c = self.model_config
        slot = quant.kv_slot_size(c.head_dim, self.kv_dtype)
        # one block more than the scheduler hands out: the scratch block padding rows of static steps write to
        # head-major (layers/attention.py): a gathered context is contiguous per head
        shape = (c.num_kv_heads, num_blocks + 1, block_size, slot)
        # zeros, not empty: attention reads whole blocks and masks the unwritten tail of the last one (and
        # padding blocks), but a masked NaN still poisons softmax(QK^T)V, and uninitialised memory (reused
        # heap or allocator cache) does hold NaN bit patterns. Swap space too: swap-in copies whole blocks.
        self.kv_caches = [(_zeros(shape, self.kv_dtype, self.device), _zeros(shape, self.kv_dtype, self.device))
                          for _ in range(c.num_layers)]
        swap_shape = (c.num_kv_heads, num_swap_blocks, block_size, slot)
        pin = self.device.type == "cuda"
        self.swap_caches = [(_zeros(swap_shape, self.kv_dtype, torch.device("cpu"), pin),
                             _zeros(swap_shape, self.kv_dtype, torch.device("cpu"), pin))
                            for _ in range(c.num_layers)] if num_swap_blocks else []
        self.block_size = block_size
        self.batch = PersistentBatch(block_size, -(-max_model_len // block_size), max_num_seqs, self.device,
                                     scratch_block=num_blocks, mask_dtype=self.dtype)
        self.decode_buckets = decode_buckets(max_num_seqs)

    def enable_compile(self) -> None:
        """Compile the model's forward (inductor) for decode-only steps padded to `decode_buckets`.

        One graph per bucket (warm_up_compiled() makes them all at start-up), the context length a
        dynamic size inside it; prefill and mixed steps stay eager. Weights never change after load, so
        the module guards are dropped: only the inputs' shapes select a graph.
        """
        import torch._dynamo  # here, not at module level: importing dynamo costs ~1.5 s of every start-up

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(DECODE_BUCKETS))
        self.compiled_forward = torch.compile(
            self.model.forward, dynamic=False,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    @torch.inference_mode()
    def warm_up_compiled(self) -> list[tuple[int, float]]:
        """Compile every decode bucket now (padding rows only, in the scratch block); (bucket, seconds) each."""
        timings = []
        for bucket in self.decode_buckets:
            start = time.perf_counter()
            batch = self.batch.prepare(SchedulerOutput([]), pad_to=bucket)  # an empty step: padding rows only
            try:
                self._run_compiled(batch.input_ids, batch.positions, batch.attn)
            except Exception as exc:  # inductor needs a working C++ compiler; say so in one line
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise ConfigError(f"compiling the decode step failed ({type(exc).__name__}: {first}); "
                                  f"run without --compile") from None
            timings.append((bucket, time.perf_counter() - start))
            logger.info("compiled the decode step for batch %d in %.1f s", bucket, timings[-1][1])
        return timings

    def _run_compiled(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        import torch._dynamo  # imported by enable_compile already; a dict lookup here

        # one graph for every context length: the block table's width is a symbolic size
        torch._dynamo.maybe_mark_dynamic(attn.decode_block_table, 1)
        torch._dynamo.maybe_mark_dynamic(attn.decode_mask, 3)
        return self.compiled_forward(input_ids, positions, self.kv_caches, attn)

    def _move_blocks(self, out: SchedulerOutput) -> None:
        for src, dst in out.block_copies:
            for k, v in self.kv_caches:  # [KVH, blocks, block_size, D']: blocks are dimension 1
                k[:, dst].copy_(k[:, src])
                v[:, dst].copy_(v[:, src])
        if out.swap_out:
            dev, cpu = (torch.tensor(x) for x in zip(*out.swap_out))
            for (k, v), (sk, sv) in zip(self.kv_caches, self.swap_caches):
                sk[:, cpu] = k[:, dev.to(self.device)].cpu()
                sv[:, cpu] = v[:, dev.to(self.device)].cpu()
        if out.swap_in:
            cpu, dev = (torch.tensor(x) for x in zip(*out.swap_in))
            for (k, v), (sk, sv) in zip(self.kv_caches, self.swap_caches):
                k[:, dev.to(self.device)] = sk[:, cpu].to(self.device)
                v[:, dev.to(self.device)] = sv[:, cpu].to(self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: take the scheduler's hand-off, move blocks, forward the flat batch, sample."""
        batch_state = self.batch
        batch_state.update(out)
        self._update_structured(out)
        self._move_blocks(out)
        result = ModelRunnerOutput()
        if out.is_empty:
            return result
        pad_to = self._bucket(out)
        batch = batch_state.prepare(out, pad_to)
        if pad_to is None:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)  # [T, hidden]
        else:
            hidden = self._run_compiled(batch.input_ids, batch.positions, batch.attn)
        if batch.pooling_chunks:
            result.pooled = pool_chunks(hidden, batch.pooling_chunks)
        prompt_rows = [r for r in batch.logits_rows if not r.sample]
        sample_rows = [r for r in batch.logits_rows if r.sample]
        # prompt logprobs in slices: the [rows, vocab] logits of a long echo chunk are never held at once
        for start in range(0, len(prompt_rows), PROMPT_LOGPROB_SLICE):
            part = prompt_rows[start:start + PROMPT_LOGPROB_SLICE]
            part_logits = self._logits(hidden, part)
            tops = [batch_state.states[r.request_id].sampling_params.prompt_logprobs for r in part]
            for r, entry in zip(part, prompt_logprobs(part_logits, [r.prompt_target for r in part], tops)):
                result.prompt_logprobs.setdefault(r.request_id, []).append(entry)
        if not sample_rows:
            batch_state.advance(out, {})
            return result
        logits = self._logits(hidden, sample_rows)
        row_logits, sampling_rows, owners = [], [], []
        for i, sample_row in enumerate(sample_rows):
            # a parent completing its prompt also samples the first token of each forked child
            state = batch_state.states[sample_row.request_id]
            rows_of = [(state.request_id, state.sampling_params, state.generator)]
            rows_of += [(f.request_id, f.sampling_params, f.generator) for f in out.forks.get(state.request_id, [])]
            for rid, params, generator in rows_of:
                row_logits.append(i)
                sampling_rows.append(self._sampling_row(state, params, generator))
                owners.append(rid)
        if row_logits:
            structured = self.structured
            mask = None
            if structured is not None and (structured or out.forks):
                for f in (f for fs in out.forks.values() for f in fs if f.sampling_params.structured is not None):
                    structured.add(f.request_id, f.sampling_params.structured, [])  # a fork starts its own matcher
                mask = structured.token_mask(owners) if structured else None
            sampled = self.sampler(logits[row_logits], sampling_rows, mask)
            result.sampled = dict(zip(owners, sampled))
            if mask is not None:
                for i in mask.rows:
                    sampled[i].is_grammar_end = structured.accept(owners[i], sampled[i].token_id)
        forked = {f.request_id: (parent, f) for parent, fs in out.forks.items() for f in fs}
        batch_state.advance(out, {rid: s.token_id for rid, s in result.sampled.items() if rid not in forked})
        for rid, (parent, f) in forked.items():
            child = batch_state.fork(parent, rid, f.sampling_params, f.generator)
            child.token_ids.append(result.sampled[rid].token_id)
        return result

    def _update_structured(self, out: SchedulerOutput) -> None:
        """Drop the matchers of finished and preempted samples; build one for each structured request taken on.

        A request resumed after a preemption arrives with its tokens so far: its matcher is rebuilt over them,
        so the mask always follows the tokens the request holds.
        """
        structured = self.structured
        if structured is None:
            return
        if structured:
            for rid in [*out.finished_ids, *out.preempted_ids]:
                structured.remove(rid)
        for new in out.new_requests:
            spec = new.sampling_params.structured
            if spec is not None:
                structured.add(new.request_id, spec, new.token_ids[new.num_prompt_tokens:])

    def _logits(self, hidden: torch.Tensor, rows: list) -> torch.Tensor:
        """[len(rows), vocab] fp32 logits of the hidden states at these LogitsRows."""
        return self.model.compute_logits(hidden[torch.tensor([r.row for r in rows], device=self.device)])

    def _bucket(self, out: SchedulerOutput) -> int | None:
        """The padded batch size of a compiled decode step, or None to run this step eagerly."""
        if self.compiled_forward is None or not self.batch.is_decode_only(out):
            return None
        n = len(out.num_scheduled_tokens)
        return next((b for b in self.decode_buckets if b >= n), None)

    @staticmethod
    def _sampling_row(state: RequestState, params: SamplingParams, generator: torch.Generator | None) -> SamplingRow:
        # token histories only where penalties read them: slicing long contexts every step is what we avoid
        if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
            prompt, output = state.token_ids[: state.num_prompt_tokens], state.token_ids[state.num_prompt_tokens:]
            return SamplingRow(params, generator, prompt, output)
        return SamplingRow(params, generator, [], [])
