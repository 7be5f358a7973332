"""Choose each low-bit layer's kernel by timing the candidates on this machine, per row bucket.

    report = select_kernels(model, KernelConfig())   # after the weights are loaded and packed

Layers are grouped by (format, shape, role); per group and per row bucket the candidates that meet
the accuracy asked for are checked against the layer's dequantized weights (a candidate that raises
or gives wrong values is dropped), timed over the group's own layers in turn (so the weights stream
from memory as in a real step, not from cache), and the fastest is installed as the layer's
`kernel_table`. Timings are cached per machine (cache.py); a second start measures nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from roofline.kernels.cache import KernelCache, MachineKey, machine_key
from roofline.kernels.candidates import (CANDIDATES, Accuracy, Kernel, KernelCandidate, LowBitWeights,
                                         candidates_for)

ROW_BUCKETS = (1, 4, 16, 64, 256)  # rows the probe times; a call uses the largest bucket <= its rows
# relative error (max |y - ref| / max |ref|) a candidate may show on the check input, per accuracy class
TOLERANCE = {Accuracy.EXACT: 1e-3, Accuracy.BF16: 3e-2, Accuracy.INT8: 1.5e-1}
MAX_PROBE_MODULES = 8  # layers timed in turn per pass: enough to stream weights, bounded probe time
PROBE_PASSES = 3  # best of this many passes (after one warm-up pass)


@dataclass
class KernelTable:
    """A layer's chosen kernel per row bucket."""

    buckets: tuple[int, ...]
    kernels: list[Kernel]
    names: list[str]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        # the last bucket <= rows (else the first); a plain loop, which torch.compile traces (bisect it cannot)
        rows, i = x.shape[0], 0
        for j, bucket in enumerate(self.buckets):
            if bucket <= rows:
                i = j
        return self.kernels[i](x)


@dataclass
class ShapeReport:
    """What was measured and chosen for one group of same-shaped layers."""

    label: str  # e.g. "int8 49152x576 head"
    num_modules: int
    accuracy: Accuracy  # the loosest class allowed for this group
    timings: dict[str, dict[int, float]] = field(default_factory=dict)  # candidate -> bucket -> microseconds
    dropped: dict[str, str] = field(default_factory=dict)  # candidate -> why
    chosen: dict[int, str] = field(default_factory=dict)  # bucket -> candidate
    from_cache: bool = False


@dataclass
class KernelReport:
    """Every group's measurements and choices, and the machine they hold for."""

    machine: MachineKey
    shapes: list[ShapeReport] = field(default_factory=list)
    probe_seconds: float = 0.0

    def format(self) -> str:
        """A table: per shape and candidate, microseconds per row bucket, the choice starred."""
        lines = [f"machine: {self.machine.describe()}",
                 f"probe: {self.probe_seconds:.1f} s" + (" (all from cache)" if all(s.from_cache for s in self.shapes)
                                                          else "")]
        head = "  ".join(f"{b:>9}" for b in ROW_BUCKETS)
        for s in self.shapes:
            lines.append("")
            lines.append(f"{s.label} x{s.num_modules} (accuracy <= {s.accuracy.name.lower()})"
                         + (" [cached]" if s.from_cache else ""))
            lines.append(f"  {'candidate':<16}{head}   (us per call, * = chosen)")
            for name, per_bucket in s.timings.items():
                cells = []
                for b in ROW_BUCKETS:
                    us = per_bucket.get(b)
                    mark = "*" if s.chosen.get(b) == name else " "
                    cells.append(f"{'-' if us is None else f'{us:.0f}':>8}{mark}")
                lines.append(f"  {name:<16}" + " ".join(cells))
            if not s.timings and s.chosen:
                lines.append(f"  {s.chosen[ROW_BUCKETS[0]]:<16}the only candidate: checked, not timed")
            for name, why in s.dropped.items():
                lines.append(f"  {name:<16}dropped: {why}")
        return "\n".join(lines)


def low_bit_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every layer that offers `kernel_weights()` (int8/int4 linears, the int8 head)."""
    return [(p, m) for p, m in model.named_modules() if hasattr(m, "kernel_weights") and m.kernel_weights() is not None]


def select_kernels(model: nn.Module, mode: str = "auto", accuracy: Accuracy = Accuracy.BF16,
                   cache: KernelCache | None = None, pool: tuple[KernelCandidate, ...] = CANDIDATES,
                   buckets: tuple[int, ...] = ROW_BUCKETS) -> KernelReport:
    """Measure and install a kernel table on every low-bit layer of `model`.

    mode: "auto" (measure, pick the fastest within `accuracy`; the head needs fp32 logits, so it is
    held to EXACT unless `accuracy` is INT8), or a candidate name (forced wherever its format applies,
    whatever its accuracy; other formats are measured). "default" leaves the layers' built-in rule.
    """
    machine = machine_key()
    report = KernelReport(machine)
    if mode == "default":
        return report
    names = {c.name for c in pool}
    if mode != "auto" and mode not in names:
        raise ValueError(f"unknown kernel {mode!r}; choose auto, default or one of {', '.join(sorted(names))}")
    start = time.perf_counter()
    groups: dict[tuple, list[nn.Module]] = {}
    for _, module in low_bit_modules(model):
        w = module.kernel_weights()
        if w.q.device.type != "cpu":
            continue  # other devices keep their generic path
        role = "head" if getattr(module, "is_head", False) else "linear"
        groups.setdefault((w.weight_format, w.out_features, w.in_features, w.group_size, role), []).append(module)
    for (fmt, n, k, g, role), modules in groups.items():
        allowed = accuracy if role == "linear" or accuracy == Accuracy.INT8 else Accuracy.EXACT
        label = f"{fmt}{'' if g is None else f' g{g}'} {n}x{k} {role}"
        forced = [c for c in pool if c.name == mode and c.weight_format == fmt]
        eligible = forced or [c for c in candidates_for(fmt, pool) if c.accuracy <= allowed]
        shape = ShapeReport(label, len(modules), allowed)
        _measure_group(shape, modules, eligible, buckets, machine, cache)
        _install(shape, modules, eligible, buckets)
        report.shapes.append(shape)
    if cache is not None:
        cache.save()
    report.probe_seconds = time.perf_counter() - start
    return report


def _measure_group(shape: ShapeReport, modules: list[nn.Module], eligible: list[KernelCandidate],
                   buckets: tuple[int, ...], machine: MachineKey, cache: KernelCache | None) -> None:
    probe_modules = modules[:MAX_PROBE_MODULES]
    weights = [m.kernel_weights() for m in probe_modules]
    reference: torch.Tensor | None = None
    shape.from_cache = True
    if len(eligible) == 1:  # nothing to choose between: check it works (once per machine), time nothing
        key = KernelCache.key(machine, f"{shape.label} check", eligible[0].name)
        entry = cache.get(key) if cache is not None else None
        if entry is None or not ("error" in entry or entry.get("ok")):
            shape.from_cache = False
            # the check dequantizes a whole layer (~20 ms a shape): a cached start skips it
            error = _check(eligible[0], weights[0], probe_modules[0].reference_weight())
            entry = {"error": error} if error is not None else {"ok": True}
            if cache is not None:
                cache.put(key, entry)
        if entry.get("error"):
            shape.dropped[eligible[0].name] = entry["error"]
        else:
            shape.chosen = {b: eligible[0].name for b in buckets}
        return
    for cand in eligible:
        key = KernelCache.key(machine, f"{shape.label} x{len(probe_modules)}", cand.name)
        entry = cache.get(key) if cache is not None else None
        if entry is not None and (entry.get("error") or all(str(b) in entry["us"] for b in buckets)):
            if entry.get("error"):
                shape.dropped[cand.name] = entry["error"]
            else:
                shape.timings[cand.name] = {b: entry["us"][str(b)] for b in buckets}
            continue
        shape.from_cache = False
        if reference is None:
            reference = probe_modules[0].reference_weight()  # [N, K] fp32
        error = _check(cand, weights[0], reference)
        if error is None:
            try:
                kernels = [cand.prepare(w) for w in weights]
                timings = {b: _time_pass(kernels, b, weights[0].in_features) for b in buckets}
            except Exception as exc:  # noqa: BLE001 - a failing candidate is dropped, whatever it raised
                error = _why(exc)
        if error is not None:
            shape.dropped[cand.name] = error
            entry = {"error": error}
        else:
            shape.timings[cand.name] = timings
            entry = {"us": {str(b): us for b, us in timings.items()}}
        if cache is not None:
            cache.put(key, entry)
    for b in buckets:
        timed = [(per_bucket[b], name) for name, per_bucket in shape.timings.items()]
        if timed:
            shape.chosen[b] = min(timed)[1]


def _why(exc: Exception) -> str:
    """An exception as the one short line a report shows."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def _check(cand: KernelCandidate, w: LowBitWeights, reference: torch.Tensor) -> str | None:
    """None if `cand` runs and matches the dequantized weight within its class's tolerance, else why not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, w.in_features, generator=gen)
    x[:, :: max(w.in_features // 8, 1)] *= 8  # a few outlier channels, as real activations have
    try:
        y = cand.prepare(w)(x).float()
    except Exception as exc:  # noqa: BLE001
        return _why(exc)
    ref = x @ reference.t()
    if y.shape != ref.shape:
        return f"wrong output shape {tuple(y.shape)}, expected {tuple(ref.shape)}"
    rel = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if not rel <= TOLERANCE[cand.accuracy]:
        return f"wrong values: relative error {rel:.2e} exceeds {TOLERANCE[cand.accuracy]:.0e}"
    return None


def _time_pass(kernels: list[Kernel], rows: int, in_features: int,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Microseconds per call, best of PROBE_PASSES passes over the layers in turn."""
    x = torch.randn(rows, in_features)
    for fn in kernels:
        fn(x)
    best = float("inf")
    for _ in range(PROBE_PASSES):
        t0 = clock()
        for fn in kernels:
            fn(x)
        best = min(best, (clock() - t0) / len(kernels))
    return best * 1e6


def _install(shape: ShapeReport, modules: list[nn.Module], eligible: list[KernelCandidate],
             buckets: tuple[int, ...]) -> None:
    if not shape.chosen:
        raise RuntimeError(f"no kernel works for {shape.label}: " +
                           "; ".join(f"{n}: {why}" for n, why in shape.dropped.items()))
    by_name = {c.name: c for c in eligible}
    names = [shape.chosen[b] for b in buckets]
    for module in modules:
        w = module.kernel_weights()
        prepared: dict[str, Kernel] = {}
        for name in set(names):
            prepared[name] = by_name[name].prepare(w)
        module.kernel_table = KernelTable(buckets, [prepared[n] for n in names], names)
