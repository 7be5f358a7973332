"""Parsing and formatting of the units a planner user types: bytes, rates, FLOP/s, durations, SLOs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from roofline.errors import ConfigError

# Decimal prefixes (datasheets quote memory and bandwidth in GB = 1e9) and binary ones (GiB).
_DECIMAL = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BINARY = {"KI": 2.0**10, "MI": 2.0**20, "GI": 2.0**30, "TI": 2.0**40}
_DURATION = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}

_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
_QUANTITY_RE = re.compile(_NUMBER + r"([KMGTP]I?)?\s*(B|FLOPS|FLOP/S|OPS|TOPS)?(/S)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(_NUMBER + r"(us|µs|ms|s|min)\s*$")


def parse_quantity(text: str | float | int, what: str = "value") -> float:
    """Parse '80GB', '16GiB', '3.35TB/s', '312T', '1.5e12' into a plain number (bytes, bytes/s or FLOP/s)."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _QUANTITY_RE.match(str(text))
    if match is None:
        raise ConfigError(f"{what}: cannot read {text!r}; write a number with an optional unit, e.g. 80GB, 3.35TB/s, 312T")
    number, prefix = float(match.group(1)), (match.group(2) or "").upper()
    scale = _BINARY[prefix] if prefix in _BINARY else _DECIMAL[prefix]
    return number * scale


def parse_duration(text: str, what: str = "duration") -> float:
    """Parse '500ms', '1s', '200us' into seconds; a bare number is refused as ambiguous."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ConfigError(f"{what}: cannot read {text!r}; give a number with a unit (us, ms, s), e.g. 500ms")
    return float(match.group(1)) * _DURATION[match.group(2)]


@dataclass(frozen=True)
class Slo:
    """A latency target: time to first token and time per output token, in seconds (None: no bound)."""

    ttft_s: float | None = None  # seconds from request arrival to the first token
    tpot_s: float | None = None  # seconds between consecutive output tokens

    def is_met(self, ttft_s: float, tpot_s: float) -> bool:
        """True when both predicted latencies are within their bounds."""
        return ((self.ttft_s is None or ttft_s <= self.ttft_s)
                and (self.tpot_s is None or tpot_s <= self.tpot_s))

    def __str__(self) -> str:
        parts = [f"{name}={format_seconds(value)}" for name, value in
                 (("ttft", self.ttft_s), ("tpot", self.tpot_s)) if value is not None]
        return ",".join(parts) or "none"


def parse_slo(text: str | None) -> Slo:
    """Parse 'ttft=500ms,tpot=50ms' (either part optional) into an Slo."""
    if not text:
        return Slo()
    values: dict[str, float] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("ttft", "tpot"):
            raise ConfigError(f"--slo: cannot read {item!r}; write e.g. ttft=500ms,tpot=50ms")
        values[key + "_s"] = parse_duration(value.strip(), f"--slo {key}")
        if values[key + "_s"] <= 0:
            raise ConfigError(f"--slo {key} must be positive, got {value!r}")
    return Slo(**values)


def format_bytes(num_bytes: float) -> str:
    """Format a byte count with a decimal prefix: 16.06 GB."""
    for prefix, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {prefix}"
    return f"{num_bytes:.0f} B"


def format_rate(value: float, unit: str) -> str:
    """Format a rate with a decimal prefix: 3.35 TB/s, 989 TFLOP/s."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_seconds(seconds: float) -> str:
    """Format a duration compactly: 42.1ms, 1.20s, 850us."""
    if seconds >= 1.0:
        return f"{seconds:.2f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds * 1e6:.0f}us"
