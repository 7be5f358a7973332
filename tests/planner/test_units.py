"""Parsing of sizes, rates, durations and SLOs."""

import pytest

from roofline.errors import ConfigError
from roofline.planner.units import Slo, parse_duration, parse_quantity, parse_slo


def test_parse_slo():
    assert parse_slo("ttft=500ms,tpot=50ms") == Slo(ttft_s=0.5, tpot_s=0.05)
    assert parse_slo("ttft=1s, tpot=50ms") == Slo(ttft_s=1.0, tpot_s=0.05)
    assert parse_slo("tpot=200us").tpot_s == pytest.approx(2e-4)
    assert parse_slo(None) == Slo()
    assert Slo(0.5, 0.05).is_met(0.5, 0.04) and not Slo(0.5, 0.05).is_met(0.6, 0.04)


@pytest.mark.parametrize("bad", ["ttft=500", "latency=1s", "ttft500ms", "ttft=-1s", "ttft=0ms"])
def test_parse_slo_rejects(bad):
    with pytest.raises(ConfigError):
        parse_slo(bad)


def test_parse_quantity_units():
    assert parse_quantity("80GB") == 80e9
    assert parse_quantity("16GiB") == 16 * 2**30
    assert parse_quantity("3.35TB/s") == pytest.approx(3.35e12)
    assert parse_quantity("312T") == pytest.approx(312e12)
    assert parse_quantity("1.5e12") == 1.5e12
    assert parse_quantity(7) == 7.0
    with pytest.raises(ConfigError):
        parse_quantity("lots")


def test_parse_duration():
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("20 ms") == pytest.approx(0.02)
    with pytest.raises(ConfigError, match="unit"):
        parse_duration("20")
