"""HardwareSpec: one device's memory, bandwidths, FLOP/s per dtype and price; presets and custom specs."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from roofline.errors import ConfigError
from roofline.planner.eager import FLOAT_ALIASES, RuntimeCosts, interpolate_curve
from roofline.planner.units import parse_quantity

FLOAT_DTYPES = ("fp32", "bf16", "fp16")
GB = 1e9
TB = 1e12
TFLOP = 1e12
GPU_RESERVED_BYTES = 2 * GB  # CUDA context, cuBLAS workspace, NCCL buffers, allocator slack
CPU_RESERVED_BYTES = 4 * GB  # operating system and other processes
NVLINK_LATENCY_S = 8e-6  # one small all-reduce over NVLink / Infinity Fabric
PCIE_LATENCY_S = 25e-6  # one small all-reduce through PCIe and host
NVME_BANDWIDTH = 2 * GB  # sequential read of a typical cloud NVMe volume
SERVER_HOST_BANDWIDTH = 200 * GB  # 2-socket host of an 8-GPU SXM server (DDR5, 8+ channels each)
WORKSTATION_HOST_BANDWIDTH = 100 * GB  # single-socket host of PCIe cards
# Fixed time per transformer layer per forward pass: gaps between ~10 kernels captured in a CUDA
# graph on a GPU; dispatch of ~30 eager PyTorch ops (1 us each) on a CPU.
GPU_LAYER_OVERHEAD_S = 10e-6
CPU_LAYER_OVERHEAD_S = 30e-6


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator (or CPU socket) as the roofline model sees it; all figures per device."""

    name: str
    memory_bytes: float  # device memory (RAM for a CPU)
    memory_bandwidth: float  # bytes/s the device reads its memory at
    flops: dict[str, float]  # dense FLOP/s by compute dtype: fp32, bf16, fp16, fp8, int8, int4
    interconnect_bandwidth: float  # bytes/s per direction between devices (NVLink, or PCIe)
    interconnect_latency_s: float = PCIE_LATENCY_S  # fixed cost of one all-reduce
    host_link_bandwidth: float | None = None  # bytes/s host->device (PCIe); None on a CPU
    host_memory_bytes: float = 0.0  # host RAM this device may offload into
    host_bandwidth: float = 0.0  # bytes/s of host RAM (attention over offloaded KV runs there)
    disk_bandwidth: float = NVME_BANDWIDTH  # bytes/s sequential disk read
    usd_per_hour: float = 0.0  # typical on-demand price per device
    reserved_bytes: float = GPU_RESERVED_BYTES  # memory the runtime holds outside the planner's terms
    is_cpu: bool = False  # the "device" is the CPU itself: offload goes to disk only
    layer_overhead_s: float = GPU_LAYER_OVERHEAD_S  # fixed seconds per layer per forward pass
    prefill_layer_overhead_s: float | None = None  # per layer of a prefill chunk; None: layer_overhead_s
    # Measured achieved matmul FLOP/s by dtype against rows (tokens) per step: ((rows, FLOP/s), ...)
    # ascending; None: every matmul runs at `flops` (the datasheet/large-matmul peak).
    matmul_curve: dict[str, tuple[tuple[float, float], ...]] | None = None
    # This runtime's measured eager costs (a calibrated `local` profile): when set, steps are charged
    # the runtime's matmul curves by width, dispatch, elementwise work, paged attention and sampling.
    runtime: RuntimeCosts | None = None

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "memory_bandwidth", "interconnect_bandwidth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"hardware {self.name}: {name} must be positive")
        if not any(self.flops.get(dtype, 0) > 0 for dtype in FLOAT_DTYPES):
            raise ConfigError(f"hardware {self.name}: give FLOP/s for at least one of {FLOAT_DTYPES}")
        if self.reserved_bytes >= self.memory_bytes:
            raise ConfigError(f"hardware {self.name}: reserved memory exceeds device memory")

    def flops_for(self, dtype: str) -> float:
        """FLOP/s of matmuls in dtype; fp16 and bf16 stand in for each other, else the best float rate."""
        alias = FLOAT_ALIASES.get(dtype)
        for key in (dtype, alias):
            if key is not None and self.flops.get(key, 0) > 0:
                return self.flops[key]
        # A dtype without hardware support runs dequantized in the fastest float dtype.
        return max(self.flops.get(key, 0.0) for key in FLOAT_DTYPES)

    def _curve(self, dtype: str) -> tuple[tuple[float, float], ...] | None:
        alias = FLOAT_ALIASES.get(dtype)
        return next((self.matmul_curve[key] for key in (dtype, alias)
                     if key is not None and self.matmul_curve and self.matmul_curve.get(key)), None)

    def has_matmul_curve(self, dtype: str) -> bool:
        """Whether matmuls in dtype have a measured rate-against-rows curve (a calibrated profile)."""
        return self._curve(dtype) is not None

    def matmul_rate(self, dtype: str, rows: float) -> float:
        """Achieved matmul FLOP/s in dtype at `rows` tokens per step: the measured curve interpolated
        in log rows (clamped at its ends) when the hardware has one for dtype, else flops_for(dtype)."""
        curve = self._curve(dtype)
        return interpolate_curve(curve, rows) if curve else self.flops_for(dtype)

    def prefill_overhead_s(self) -> float:
        """Fixed seconds per layer of one prefill chunk."""
        return self.layer_overhead_s if self.prefill_layer_overhead_s is None else self.prefill_layer_overhead_s

    def has_dtype(self, dtype: str) -> bool:
        """Whether the device has native matmul support for dtype."""
        return self.flops.get(dtype, 0) > 0

    def ridge_point(self, dtype: str) -> float:
        """FLOPs per byte at which compute time equals memory time (the roofline's knee)."""
        return self.flops_for(dtype) / self.memory_bandwidth


def _gpu(name: str, memory_gb: float, bandwidth_tb: float, tflops: dict[str, float],
         interconnect_gb: float, host_link_gb: float, host_memory_gb: float, usd: float,
         is_nvlink: bool) -> HardwareSpec:
    return HardwareSpec(
        name=name, memory_bytes=memory_gb * GB, memory_bandwidth=bandwidth_tb * TB,
        flops={dtype: rate * TFLOP for dtype, rate in tflops.items()},
        interconnect_bandwidth=interconnect_gb * GB,
        interconnect_latency_s=NVLINK_LATENCY_S if is_nvlink else PCIE_LATENCY_S,
        host_link_bandwidth=host_link_gb * GB, host_memory_bytes=host_memory_gb * GB,
        host_bandwidth=SERVER_HOST_BANDWIDTH if is_nvlink else WORKSTATION_HOST_BANDWIDTH, usd_per_hour=usd)


def hardware_presets() -> dict[str, HardwareSpec]:
    """Preset HardwareSpecs by name, datasheet dense figures (no sparsity); a fresh dict each call."""
    ampere = {"fp32": 19.5, "bf16": 312, "fp16": 312, "int8": 624, "int4": 1248}
    hopper = {"fp32": 67, "bf16": 989, "fp16": 989, "fp8": 1979, "int8": 1979}
    presets = [
        # PCIe cards: the GPUs talk to each other over PCIe (per direction).
        _gpu("t4", 16, 0.32, {"fp32": 8.1, "fp16": 65, "int8": 130, "int4": 260}, 16, 16, 52, 0.35, False),
        _gpu("l4", 24, 0.30, {"fp32": 30.3, "bf16": 121, "fp16": 121, "fp8": 242, "int8": 242}, 32, 32, 64, 0.80, False),
        _gpu("a10g", 24, 0.60, {"fp32": 31.2, "bf16": 70, "fp16": 70, "int8": 140, "int4": 280}, 32, 32, 64, 1.01, False),
        # SXM parts: NVLink (A100 300 GB/s, H100/H200 450 GB/s per direction), Infinity Fabric for MI300X.
        _gpu("a100-40gb", 40, 1.555, ampere, 300, 32, 128, 3.00, True),
        _gpu("a100-80gb", 80, 2.039, ampere, 300, 32, 256, 4.00, True),
        _gpu("h100", 80, 3.35, hopper, 450, 64, 256, 4.50, True),
        _gpu("h200", 141, 4.8, hopper, 450, 64, 256, 5.50, True),
        _gpu("mi300x", 192, 5.3, {"fp32": 163.4, "bf16": 1307, "fp16": 1307, "fp8": 2615, "int8": 2615},
             448, 64, 256, 4.00, True),
        # A generic 16-core server socket with 4 DDR5 channels.
        HardwareSpec(name="cpu", memory_bytes=64 * GB, memory_bandwidth=150 * GB,
                     flops={"fp32": 2.0 * TFLOP, "bf16": 2.0 * TFLOP},
                     interconnect_bandwidth=25 * GB, interconnect_latency_s=50e-6,
                     host_memory_bytes=0.0, host_bandwidth=150 * GB, usd_per_hour=0.70,
                     reserved_bytes=CPU_RESERVED_BYTES, is_cpu=True,
                     layer_overhead_s=CPU_LAYER_OVERHEAD_S),
    ]
    return {spec.name: spec for spec in presets}


def hardware_from_mapping(raw: dict, where: str) -> HardwareSpec:
    """A HardwareSpec from a dict (a JSON/YAML file): field names as keys, numbers or unit strings as values."""
    raw = dict(raw)
    base_name = raw.pop("base", None)
    known = {f.name for f in fields(HardwareSpec)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown hardware fields {sorted(unknown)}; known: {sorted(known)}")
    values: dict = {}
    for key, value in raw.items():
        if key == "flops":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: flops must map dtype to FLOP/s, e.g. {{bf16: 312T}}")
            values[key] = {dtype: parse_quantity(rate, f"{where} flops.{dtype}") for dtype, rate in value.items()}
        elif key == "matmul_curve":
            values[key] = None if value is None else {
                dtype: tuple((float(rows), parse_quantity(rate, f"{where} matmul_curve.{dtype}"))
                             for rows, rate in points) for dtype, points in value.items()}
        elif key == "runtime":
            values[key] = None if value is None else RuntimeCosts.from_mapping(value)
        elif key in ("name", "is_cpu"):
            values[key] = value
        elif value is not None:
            values[key] = parse_quantity(value, f"{where} {key}")
    if base_name is not None:
        return replace(get_preset_hardware(base_name), **values)
    missing = {"name", "memory_bytes", "memory_bandwidth", "flops", "interconnect_bandwidth"} - set(values)
    if missing:
        raise ConfigError(f"{where}: missing {sorted(missing)} (or give `base: h100` to start from a preset)")
    return HardwareSpec(**values)


def get_preset_hardware(name: str) -> HardwareSpec:
    """A preset HardwareSpec by name, with a one-line error listing the presets."""
    presets = hardware_presets()
    if name.lower() not in presets:
        raise ConfigError(f"unknown hardware {name!r}; presets are {', '.join(presets)}, "
                          "or `local`, or a .json/.yaml file")
    return presets[name.lower()]


def with_overrides(spec: HardwareSpec, overrides: dict[str, object]) -> HardwareSpec:
    """A copy of spec with the given fields replaced (None values ignored), flops merged per dtype."""
    values = {key: value for key, value in overrides.items() if value is not None}
    if "flops" in values:
        values["flops"] = {**spec.flops, **values["flops"]}  # type: ignore[dict-item]
    return replace(spec, **values) if values else spec


