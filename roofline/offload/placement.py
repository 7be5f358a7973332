"""Where each decoder layer's weights and the KV cache live: device, host RAM or disk.

The planner thinks in fractions (`roofline.planner.layout.Placement`, FlexGen's policy); the executor
needs a tier per layer. `LayerPlacement` is the per-layer form, made from fractions or from the
`w=20/80/0,kv=100/0` text the CLI takes (percent device/host/disk, then percent KV device/host).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from roofline.errors import ConfigError
from roofline.planner.layout import Placement


class Tier(str, enum.Enum):
    """A memory tier: device memory (on a CPU-only machine, the RAM budget), host RAM, disk."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


_PLACEMENT_RE = re.compile(r"^w=(\d+)/(\d+)/(\d+)(?:,kv=(\d+)/(\d+))?$")
PLACEMENT_SYNTAX = "w=DEVICE/HOST/DISK[,kv=DEVICE/HOST] in percent, e.g. w=20/80/0,kv=100/0"


@dataclass(frozen=True)
class LayerPlacement:
    """One tier per decoder layer for its weights, and the share of the KV cache kept on the device."""

    layer_tiers: tuple[Tier, ...]  # index = decoder layer; embedding, head and norms stay on the device
    kv_on_device: float = 1.0  # the rest of the KV blocks would live in host RAM

    def __post_init__(self) -> None:
        if not self.layer_tiers:
            raise ConfigError("offload placement: the model has no decoder layers to place")
        if not 0.0 <= self.kv_on_device <= 1.0:
            raise ConfigError(f"offload placement: the KV device share must be in [0, 1], got {self.kv_on_device}")

    @classmethod
    def from_fractions(cls, placement: Placement, num_layers: int) -> LayerPlacement:
        """Round the planner's fractions to whole layers; device layers first, then host, then disk."""
        on_device = round(placement.weights_on_device * num_layers)
        on_host = min(round(placement.weights_on_host * num_layers), num_layers - on_device)
        on_disk = num_layers - on_device - on_host
        tiers = (Tier.DEVICE,) * on_device + (Tier.HOST,) * on_host + (Tier.DISK,) * on_disk
        return cls(tiers, placement.kv_on_device)

    @property
    def num_layers(self) -> int:
        """Decoder layers placed."""
        return len(self.layer_tiers)

    def layers_on(self, tier: Tier) -> list[int]:
        """Indices of the layers whose weights live on `tier`."""
        return [i for i, t in enumerate(self.layer_tiers) if t is tier]

    @property
    def offloaded_layers(self) -> list[int]:
        """Layers streamed in for every forward pass (host or disk), in forward order."""
        return [i for i, t in enumerate(self.layer_tiers) if t is not Tier.DEVICE]

    @property
    def is_offloaded(self) -> bool:
        """Whether anything lives off the device."""
        return bool(self.offloaded_layers) or self.kv_on_device < 1.0

    def fractions(self) -> Placement:
        """The planner's view of this placement (shares of layers per tier)."""
        n = self.num_layers
        return Placement(len(self.layers_on(Tier.DEVICE)) / n, len(self.layers_on(Tier.HOST)) / n,
                         len(self.layers_on(Tier.DISK)) / n, self.kv_on_device)

    def describe(self) -> str:
        """The planner's notation, e.g. 'w0/100/0 kv100/0' ('none' when nothing is offloaded)."""
        return self.fractions().describe()


def parse_placement(text: str, num_layers: int) -> LayerPlacement:
    """Read `w=20/80/0,kv=100/0` (percent of weights device/host/disk, KV device/host) for a model's layers."""
    match = _PLACEMENT_RE.match(text.replace(" ", ""))
    if match is None:
        raise ConfigError(f"offload placement {text!r}: write {PLACEMENT_SYNTAX}")
    weights = [int(g) for g in match.groups()[:3]]
    kv = [int(g) for g in match.groups()[3:]] if match.group(4) is not None else [100, 0]
    if sum(weights) != 100:
        raise ConfigError(f"offload placement {text!r}: weight percentages must sum to 100, got {sum(weights)}")
    if sum(kv) != 100:
        raise ConfigError(f"offload placement {text!r}: KV percentages must sum to 100, got {sum(kv)}")
    return LayerPlacement.from_fractions(Placement(*(w / 100 for w in weights), kv[0] / 100), num_layers)
