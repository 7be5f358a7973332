"""What a plan decides: weight/KV formats, parallel degrees, offload placement; and the workload it serves."""

from __future__ import annotations

from dataclasses import dataclass, field

from roofline.errors import ConfigError
from roofline.planner.formats import WeightFormat, kv_bytes_per_element

FRACTION_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Placement:
    """Fractions of weights (device/host/disk) and KV cache (device/host) per tier, FlexGen style."""

    weights_on_device: float = 1.0
    weights_on_host: float = 0.0  # streamed to the device over the host link each step
    weights_on_disk: float = 0.0  # streamed disk -> host -> device each step
    kv_on_device: float = 1.0  # the rest lives in host RAM, where the CPU computes its attention

    def __post_init__(self) -> None:
        total = self.weights_on_device + self.weights_on_host + self.weights_on_disk
        fractions = (self.weights_on_device, self.weights_on_host, self.weights_on_disk, self.kv_on_device)
        if abs(total - 1.0) > FRACTION_TOLERANCE or not all(0.0 <= f <= 1.0 for f in fractions):
            raise ConfigError(f"placement: weight fractions must be in [0, 1] and sum to 1, got {fractions[:3]}")

    @property
    def is_offloaded(self) -> bool:
        """Whether anything lives outside device memory."""
        return self.weights_on_device < 1.0 or self.kv_on_device < 1.0

    def describe(self) -> str:
        """Short text: 'device' or 'w 50/50/0 kv 100/0' (percent device/host/disk)."""
        if not self.is_offloaded:
            return "none"
        pct = [round(100 * f) for f in (self.weights_on_device, self.weights_on_host, self.weights_on_disk)]
        kv = round(100 * self.kv_on_device)
        return f"w{pct[0]}/{pct[1]}/{pct[2]} kv{kv}/{100 - kv}"


@dataclass(frozen=True)
class Layout:
    """How one model is laid out on devices: formats, tensor/pipeline degree, replicas, offload."""

    weight_format: WeightFormat
    kv_format: str  # "bf16", "fp8", ... (see formats.KV_BYTES)
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline-parallel degree (stages)
    replicas: int = 1  # independent copies serving different requests
    placement: Placement = field(default_factory=Placement)

    def __post_init__(self) -> None:
        kv_bytes_per_element(self.kv_format)  # validates the name
        if min(self.tp, self.pp, self.replicas) < 1:
            raise ConfigError("layout: tp, pp and replicas must be at least 1")
        if self.placement.is_offloaded and self.tp * self.pp > 1:
            raise ConfigError("layout: offloading is modeled for a single device per replica (tp=pp=1)")

    @property
    def devices_per_replica(self) -> int:
        """Devices one replica spans."""
        return self.tp * self.pp

    @property
    def num_devices(self) -> int:
        """Devices the whole layout uses."""
        return self.devices_per_replica * self.replicas

    @property
    def kv_bytes(self) -> int:
        """Bytes per KV element."""
        return kv_bytes_per_element(self.kv_format)


@dataclass(frozen=True)
class Workload:
    """Request shape the plan is for: prompt tokens in, output tokens out."""

    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ConfigError("workload: prompt and output lengths must be at least 1 token")

    @property
    def context(self) -> int:
        """Tokens a sequence holds at its end (what its KV cache must fit)."""
        return self.prompt_len + self.output_len

    @property
    def mean_decode_context(self) -> float:
        """Average tokens attended over the decode steps."""
        return self.prompt_len + self.output_len / 2
