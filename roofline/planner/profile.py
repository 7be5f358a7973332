"""The calibration profile `roofline calibrate` writes and `--hardware local` reads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from roofline.errors import ConfigError
from roofline.planner.hardware import CPU_RESERVED_BYTES, GPU_RESERVED_BYTES, HardwareSpec

PROFILE_VERSION = 1
PROFILE_FILE = "hardware-local.json"
# Eager PyTorch ops in one Llama block: norms, projections, rotary, cache writes, attention, MLP, residuals.
EAGER_OPS_PER_LAYER = 32


def cache_dir() -> Path:
    """roofline's cache directory: $ROOFLINE_CACHE_DIR, else $XDG_CACHE_HOME/roofline, else ~/.cache/roofline."""
    if os.environ.get("ROOFLINE_CACHE_DIR"):
        return Path(os.environ["ROOFLINE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "roofline"


def default_profile_path() -> Path:
    """Where calibrate saves, and `--hardware local` looks for, the local profile."""
    return cache_dir() / PROFILE_FILE


@dataclass
class CalibrationProfile:
    """Measured ceilings of this machine; bandwidths in bytes/s, rates in FLOP/s."""

    device: str  # "cpu" or "cuda: <device name>"
    num_threads: int  # torch threads the CPU measurements used
    memory_bytes: float  # device memory (RAM on a CPU)
    read_bandwidth: float  # streaming read of one large tensor (sum)
    copy_bandwidth: float  # large tensor copy, read + write bytes counted
    gemv_bandwidth: float  # matrix-vector products over many matrices: what batch-1 decode reaches
    matmul_flops: dict[str, float]  # large square matmuls by dtype
    disk_bandwidth: float  # sequential read of an uncached file
    op_overhead_s: float  # fixed cost of one tiny op: dispatch on a CPU, launch on a GPU
    host_link_bandwidth: float | None = None  # pinned host->device copy, GPU only
    host_memory_bytes: float = 0.0  # host RAM next to a GPU
    host_bandwidth: float | None = None  # host RAM read bandwidth next to a GPU
    # achieved matmul FLOP/s by dtype against rows per step: [[rows, FLOP/s], ...], weights out of cache
    matmul_curve: dict[str, list[list[float]]] | None = None
    decode_layer_overhead_s: float | None = None  # one decoder layer of this runtime, one decode token
    prefill_layer_overhead_s: float | None = None  # one decoder layer, one prompt chunk
    is_quick: bool = False  # measured with --quick (small sizes, noisier)
    created: str = ""  # ISO timestamp
    notes: list[str] = field(default_factory=list)  # caveats found while measuring
    version: int = PROFILE_VERSION

    def to_hardware(self) -> HardwareSpec:
        """The HardwareSpec `--hardware local` means: the achievable (GEMV) bandwidth, measured FLOP/s."""
        is_cpu = self.host_link_bandwidth is None
        return HardwareSpec(
            name="local", memory_bytes=self.memory_bytes, memory_bandwidth=self.gemv_bandwidth,
            flops=dict(self.matmul_flops),
            interconnect_bandwidth=self.host_link_bandwidth or self.copy_bandwidth,
            host_link_bandwidth=self.host_link_bandwidth, host_memory_bytes=self.host_memory_bytes,
            host_bandwidth=self.host_bandwidth or self.read_bandwidth, disk_bandwidth=self.disk_bandwidth,
            usd_per_hour=0.0, is_cpu=is_cpu,
            # The measured decoder layer when the profile has one, else ops per layer x one op.
            layer_overhead_s=(self.decode_layer_overhead_s if self.decode_layer_overhead_s is not None
                              else EAGER_OPS_PER_LAYER * self.op_overhead_s),
            prefill_layer_overhead_s=self.prefill_layer_overhead_s,
            matmul_curve={dtype: tuple((rows, rate) for rows, rate in points)
                          for dtype, points in (self.matmul_curve or {}).items()} or None,
            reserved_bytes=min(CPU_RESERVED_BYTES if is_cpu else GPU_RESERVED_BYTES, self.memory_bytes / 4))


def save_profile(profile: CalibrationProfile, path: Path) -> None:
    """Write the profile as JSON, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(profile), indent=2) + "\n")


def load_profile(path: Path | None = None) -> CalibrationProfile:
    """Read a saved profile; a one-line error when none exists or it is unreadable."""
    path = path or default_profile_path()
    if not path.is_file():
        raise ConfigError(f"no local hardware profile at {path}: run `roofline calibrate` first")
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != PROFILE_VERSION:
            raise ConfigError(f"hardware profile {path} has an old format: run `roofline calibrate` again")
        return CalibrationProfile(**raw)
    except (json.JSONDecodeError, TypeError) as error:
        raise ConfigError(f"hardware profile {path} is unreadable ({error}): "
                          "run `roofline calibrate` again") from None
