"""Placements: the `w=…,kv=…` text, rounding the planner's fractions to whole layers, one-line errors."""

from __future__ import annotations

import pytest

from roofline.errors import ConfigError
from roofline.offload.placement import LayerPlacement, Tier, parse_placement
from roofline.planner.layout import Placement

D, H, K = Tier.DEVICE, Tier.HOST, Tier.DISK


def test_percentages_become_one_tier_per_layer_device_first():
    p = parse_placement("w=20/80/0,kv=100/0", 10)
    assert p.layer_tiers == (D,) * 2 + (H,) * 8
    assert p.offloaded_layers == list(range(2, 10))
    assert p.describe() == "w20/80/0 kv100/0"
    assert parse_placement("w=25/25/50", 4).layer_tiers == (D, H, K, K)
    assert parse_placement(" w=0/0/100 ", 3).layer_tiers == (K, K, K)


def test_kv_defaults_to_the_device_and_a_resident_placement_is_not_offloaded():
    p = parse_placement("w=100/0/0", 6)
    assert p.kv_on_device == 1.0 and not p.is_offloaded and p.describe() == "none"
    assert parse_placement("w=100/0/0,kv=50/50", 6).is_offloaded


def test_the_planners_fractions_round_to_whole_layers_and_back():
    p = LayerPlacement.from_fractions(Placement(0.5, 0.25, 0.25), 8)
    assert p.layer_tiers == (D,) * 4 + (H,) * 2 + (K,) * 2
    assert p.fractions() == Placement(0.5, 0.25, 0.25)
    thirds = LayerPlacement.from_fractions(Placement(0.25, 0.0, 0.75), 3)  # 0.75 layers on the device rounds up
    assert thirds.layer_tiers == (D, K, K) and thirds.num_layers == 3


@pytest.mark.parametrize("text, message", [
    ("w=20/70/0", "weight percentages must sum to 100, got 90"),
    ("w=20/80/0,kv=90/0", "KV percentages must sum to 100, got 90"),
    ("w=20/80", "write w=DEVICE/HOST/DISK"),
    ("kv=100/0", "write w=DEVICE/HOST/DISK"),
    ("w=-5/105/0", "write w=DEVICE/HOST/DISK"),
    ("20/80/0", "write w=DEVICE/HOST/DISK"),
])
def test_bad_placements_get_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_placement(text, 4)
    assert "\n" not in str(info.value)


def test_a_placement_needs_layers():
    with pytest.raises(ConfigError, match="no decoder layers"):
        LayerPlacement(())
