"""The calibration profile `roofline calibrate` writes and `--hardware local` reads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from roofline.errors import ConfigError
from roofline.planner.eager import RuntimeCosts
from roofline.planner.hardware import CPU_RESERVED_BYTES, GPU_RESERVED_BYTES, HardwareSpec

PROFILE_VERSION = 2  # 2: the runtime's eager costs replace v1's matmul curve and layer cost
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
    runtime: dict | None = None  # this runtime's eager costs: RuntimeCosts as a dict (see planner/eager.py)
    is_quick: bool = False  # measured with --quick (small sizes, noisier)
    created: str = ""  # ISO timestamp
    notes: list[str] = field(default_factory=list)  # caveats found while measuring
    version: int = PROFILE_VERSION

    def to_hardware(self) -> HardwareSpec:
        """The HardwareSpec `--hardware local` means: the achievable (GEMV) bandwidth, measured FLOP/s."""
        is_cpu = self.host_link_bandwidth is None
        runtime = RuntimeCosts.from_mapping(self.runtime) if self.runtime is not None else None
        return HardwareSpec(
            name="local", memory_bytes=self.memory_bytes, memory_bandwidth=self.gemv_bandwidth,
            flops=dict(self.matmul_flops),
            interconnect_bandwidth=self.host_link_bandwidth or self.copy_bandwidth,
            host_link_bandwidth=self.host_link_bandwidth, host_memory_bytes=self.host_memory_bytes,
            host_bandwidth=self.host_bandwidth or self.read_bandwidth, disk_bandwidth=self.disk_bandwidth,
            usd_per_hour=0.0, is_cpu=is_cpu,
            # The measured decoder layer when the profile has the runtime's costs, else ops per layer x one op.
            layer_overhead_s=(runtime.layer_dispatch_s if runtime is not None
                              else EAGER_OPS_PER_LAYER * self.op_overhead_s),
            runtime=runtime,
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
        profile = CalibrationProfile(**raw)
        profile.to_hardware()  # the runtime costs must parse too
        return profile
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as error:
        raise ConfigError(f"hardware profile {path} is unreadable ({error}): "
                          "run `roofline calibrate` again") from None
