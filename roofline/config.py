"""Configuration dataclasses, one per concern, validated in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field

from roofline.errors import ConfigError

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer, independent of file format."""

    architecture: str  # registry key: "llama", "mistral", "qwen2", "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: num_heads ({self.num_heads}) is not a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.hidden_act not in ("silu",):
            raise ConfigError(f"model config: activation {self.hidden_act!r} is not supported (only silu)")

    @property
    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h + (2 * d if self.qk_norm else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


@dataclass
class DeviceConfig:
    """Where and in which precision the model runs."""

    device: str = "auto"  # "auto" picks CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU (bf16 matmul is slow on most CPUs)
    num_threads: int | None = None  # CPU threads; None: $ROOFLINE_NUM_THREADS, else $OMP_NUM_THREADS, else all cores
    compile: bool = False  # torch.compile decode steps (padded to batch buckets, each compiled at start-up)

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {self.num_threads}")


@dataclass
class CacheConfig:
    """The paged KV cache: block size and how much memory it may take."""

    block_size: int = 16  # tokens per KV block
    memory_bytes: int | None = None  # KV budget in bytes; None: derived from memory_fraction
    memory_fraction: float = 0.9  # CUDA: share of total device memory for weights + KV (vLLM's gpu_memory_utilization)
    cpu_memory_fraction: float = 0.25  # CPU: share of available RAM for the KV cache when memory_bytes is None
    enable_prefix_caching: bool = True  # reuse full blocks of identical prefixes across requests
    swap_space_bytes: int = 2 << 30  # CPU memory for swapped-out KV blocks (preemption by swap)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ConfigError(f"KV cache memory must be positive, got {self.memory_bytes}")
        if not 0 < self.memory_fraction <= 1 or not 0 < self.cpu_memory_fraction <= 1:
            raise ConfigError("memory fractions must be in (0, 1]")
        if self.swap_space_bytes < 0:
            raise ConfigError(f"swap space must be >= 0, got {self.swap_space_bytes}")


SCHEDULING_POLICIES = ("fifo", "priority", "slo")


@dataclass
class SchedulerConfig:
    """Batching limits of one engine step."""

    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 512  # tokens (prefill chunks + decodes) in one step
    max_model_len: int | None = None  # context limit; None: the model's own
    preemption_mode: str = "auto"  # "auto" (cost estimate), "recompute" or "swap"
    # while sequences decode, prompt chunks are cut so a step takes about this long (from the measured cost
    # of a prompt token): a long prompt or an echo request then delays running streams by this much per
    # token, not by a full `max_num_batched_tokens` chunk. None: chunks use the whole budget
    max_decode_stall_ms: float | None = 250.0
    # "fifo": arrival order; "priority": (priority, arrival); "slo": priority, then fair shares across tenants and
    # TTFT deadlines, with admission, chunk sizing and preemption against latency targets (docs/scheduling.md)
    scheduling: str = "slo"
    tenant_weights: dict[str, float] = field(default_factory=dict)  # tenant -> share weight (default 1)

    def __post_init__(self) -> None:
        if self.scheduling not in SCHEDULING_POLICIES:
            raise ConfigError(f"scheduling must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.scheduling!r}")
        for tenant, weight in self.tenant_weights.items():
            if not (isinstance(weight, (int, float)) and 0 < weight < float("inf")):
                raise ConfigError(f"tenant {tenant!r}: weight must be a number > 0, got {weight!r}")
        if self.max_decode_stall_ms is not None and not self.max_decode_stall_ms > 0:
            raise ConfigError(f"max_decode_stall_ms must be > 0 (or None), got {self.max_decode_stall_ms}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.preemption_mode not in ("auto", "recompute", "swap"):
            raise ConfigError(f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")


@dataclass
class QuantConfig:
    """Weight quantization (docs/quantization.md)."""

    method: str = "auto"  # "auto": a GGUF file's own precision, a float checkpoint as is; "none", "int8", "int4"
    group_size: int = 32  # int4: input values per (scale, zero) pair, 32, 64 or 128
    kv_cache_dtype: str = "auto"  # "auto": the model dtype; "int8": int8 K/V with a scale per token and head
    kernels: str = "auto"  # "auto": measured per layer shape and row bucket; "default": the built-in rule; or a name
    kernel_accuracy: str = "bf16"  # loosest activation rounding a kernel may use: "exact", "bf16" or "int8"

    def __post_init__(self) -> None:
        from roofline.kernels.candidates import candidate_names  # torch-level module; config stays cheap to import

        names = ["auto", "default"] + candidate_names()
        if self.kernels not in names:
            raise ConfigError(f"kernels must be one of {', '.join(names)}, got {self.kernels!r}")
        if self.kernel_accuracy not in ("exact", "bf16", "int8"):
            raise ConfigError(f"kernel_accuracy must be exact, bf16 or int8, got {self.kernel_accuracy!r}")
        if self.method not in ("auto", "none", "int8", "int4"):
            raise ConfigError(f"quantization must be auto, none, int8 or int4, got {self.method!r}")
        if self.group_size not in (32, 64, 128):
            raise ConfigError(f"int4 group size must be 32, 64 or 128, got {self.group_size}")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ConfigError(f"kv_cache_dtype must be auto or int8, got {self.kv_cache_dtype!r}")


OFFLOAD_MODES = ("auto", "none")


@dataclass
class OffloadConfig:
    """Models larger than memory: a memory limit and where layer weights live (docs/offload.md)."""

    memory_limit: int | None = None  # bytes for weights, streaming buffers, KV cache and activations; None: none
    # "auto": the planner's best placement within memory_limit; "none"; or "w=20/80/0,kv=100/0" (percent of
    # layer weights on device/host/disk, of KV on device/host)
    offload: str = "auto"
    directory: str | None = None  # where converted per-layer files go; None: a temporary directory, removed

    def __post_init__(self) -> None:
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise ConfigError(f"memory limit must be positive, got {self.memory_limit}")
        if self.offload not in OFFLOAD_MODES and not self.offload.startswith("w="):
            raise ConfigError(f"offload must be auto, none or a placement like w=20/80/0,kv=100/0, "
                              f"got {self.offload!r}")


@dataclass
class EngineConfig:
    """Everything an engine needs, one sub-config per concern."""

    model: str = "default"  # "default", a Hugging Face directory or a .gguf file
    device: DeviceConfig = field(default_factory=DeviceConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    seed: int = 0  # seeds requests that bring no seed of their own
    show_progress: bool = False  # progress bar while weights load
