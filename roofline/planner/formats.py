"""Storage formats of weights and KV cache: bits per element (metadata included) and the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from roofline.errors import ConfigError

# Group-wise int4 (AWQ/GPTQ style): one fp16 scale and one fp16 zero point per group of weights.
INT4_GROUP_SIZE = 128
FP16_BITS = 16
# GGUF block layouts: (bytes per block, weights per block), from the ggml block structs.
GGUF_BLOCKS = MappingProxyType({
    "q4_0": (18, 32),    # 32 x 4-bit + fp16 scale
    "q4_1": (20, 32),    # 32 x 4-bit + fp16 scale + fp16 min
    "q5_0": (22, 32),    # 32 x 5-bit + fp16 scale
    "q5_1": (24, 32),    # 32 x 5-bit + fp16 scale + fp16 min
    "q8_0": (34, 32),    # 32 x int8 + fp16 scale
    "q2_k": (84, 256),   # k-quant super-blocks of 256 weights
    "q3_k": (110, 256),
    "q4_k": (144, 256),
    "q5_k": (176, 256),
    "q6_k": (210, 256),
})


@dataclass(frozen=True)
class WeightFormat:
    """How weights are stored (bits per weight incl. scales) and which dtype their matmuls run in."""

    name: str  # "bf16", "int4", "q4_1", ...
    bits_per_weight: float  # storage bits per weight, scales and zero points included
    compute_dtype: str  # key of HardwareSpec.flops the matmuls run at
    activation_bytes: int  # bytes per activation element (4 for fp32 compute, else 2)
    # The kernel roofline's own runtime runs the decoder layers' matmuls with: "float" (the activation
    # dtype), "int8" or "int4"; None where it has none. A quantized format's LM head runs in int8.
    runtime_kernel: str | None = "float"

    def __post_init__(self) -> None:
        if self.bits_per_weight <= 0:
            raise ConfigError(f"weight format {self.name}: bits per weight must be positive")

    @property
    def bytes_per_weight(self) -> float:
        """Storage bytes per weight."""
        return self.bits_per_weight / 8


# GGUF types roofline's runtime decodes into its int4 kernel's layout; it runs other quantized types as int8.
GGUF_INT4_KERNEL_TYPES = ("q4_0", "q4_1", "q4_k")


def gguf_runtime_kernel(type_name: str) -> str:
    """The runtime kernel ("int4" or "int8") that serves a GGUF tensor type (e.g. "Q4_1")."""
    return "int4" if type_name.lower() in GGUF_INT4_KERNEL_TYPES else "int8"


def _gguf_format(name: str) -> WeightFormat:
    block_bytes, block_weights = GGUF_BLOCKS[name]
    # llama.cpp quantizes activations to 8 bits and runs integer dot products on these blocks.
    return WeightFormat(name, 8 * block_bytes / block_weights, "int8", 2, gguf_runtime_kernel(name))


def weight_formats() -> dict[str, WeightFormat]:
    """All known weight formats by name (a fresh dict each call)."""
    formats = {
        "fp32": WeightFormat("fp32", 32, "fp32", 4),
        "bf16": WeightFormat("bf16", 16, "bf16", 2),
        "fp16": WeightFormat("fp16", 16, "fp16", 2),
        "fp8": WeightFormat("fp8", 8, "fp8", 2, None),  # per-tensor scale: negligible overhead
        "int8": WeightFormat("int8", 8, "int8", 2, "int8"),  # W8A8 with per-channel scales: negligible overhead
        # W4A16: weights dequantized in the kernel, matmuls in bf16.
        "int4": WeightFormat("int4", 4 + 2 * FP16_BITS / INT4_GROUP_SIZE, "bf16", 2, "int4"),
    }
    formats.update({name: _gguf_format(name) for name in GGUF_BLOCKS})
    return formats


def get_weight_format(name: str) -> WeightFormat:
    """Look up a weight format by name, with a one-line error listing the known ones."""
    formats = weight_formats()
    key = name.strip().lower()
    if key not in formats:
        raise ConfigError(f"unknown weight format {name!r}; choose from {', '.join(formats)}")
    return formats[key]


def mixed_format(name: str, bits_per_weight: float, runtime_kernel: str = "int8") -> WeightFormat:
    """A file's own mix of formats (e.g. a GGUF with Q4_1 layers and a Q8_0 embedding) as one average;
    runtime_kernel is the kernel roofline's runtime serves its decoder layers with."""
    return WeightFormat(name, bits_per_weight, "int8", 2, runtime_kernel)


# Bytes per KV cache element by format.
KV_BYTES = MappingProxyType({"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1})


def kv_bytes_per_element(kv_format: str) -> int:
    """Bytes of one KV cache element in the given format."""
    key = kv_format.strip().lower()
    if key not in KV_BYTES:
        raise ConfigError(f"unknown KV cache format {kv_format!r}; choose from {', '.join(KV_BYTES)}")
    return KV_BYTES[key]


def default_kv_format(weight_format: WeightFormat) -> str:
    """The KV format an engine uses by default: the activation dtype."""
    return "fp32" if weight_format.activation_bytes == 4 else "bf16"
