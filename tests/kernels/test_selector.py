"""The kernel selector against fake candidates: fastest wins, broken ones are dropped, the cache is keyed by machine."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from roofline.kernels import Accuracy, KernelCache, KernelCandidate, KernelTable, LowBitWeights, select_kernels
from roofline.kernels import cache as cache_module
from roofline.kernels import selector

N, K = 32, 64


class FakeLayer(nn.Module):
    """A low-bit layer as the selector sees it: int8 weights, a reference, a slot for the table."""

    def __init__(self, seed: int, is_head: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        self.scale = torch.rand(N, generator=g) / 100 + 1e-3
        self.is_head = is_head
        self.kernel_table = None

    def kernel_weights(self) -> LowBitWeights:
        return LowBitWeights("int8", N, K, self.q, self.scale, self.scale.bfloat16())

    def reference_weight(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = FakeLayer(1), FakeLayer(2), FakeLayer(3, is_head=True)


def exact(w: LowBitWeights):
    ref = w.q.float() * w.scale[:, None]
    return lambda x: x.float() @ ref.t()


def fake(name: str, accuracy: Accuracy = Accuracy.EXACT, prepare=exact) -> KernelCandidate:
    return KernelCandidate(name, "int8", accuracy, prepare, "fake")


@pytest.fixture
def fake_clock(monkeypatch):
    """Time each candidate by a cost table instead of the wall clock: candidate name -> microseconds per row."""
    costs: dict[str, float] = {}

    def time_pass(kernels, rows, in_features, clock=None):
        return costs[kernels[0].candidate_name] * rows

    monkeypatch.setattr(selector, "_time_pass", time_pass)
    return costs


def named(name: str, prepare=exact):
    def wrapped(w):
        fn = prepare(w)
        call = lambda x: fn(x)  # noqa: E731 - a closure we can tag
        call.candidate_name = name
        return call
    return wrapped


def pool(*specs):
    return tuple(fake(n, acc, named(n, p)) for n, acc, p in specs)


def test_fastest_within_accuracy_wins(fake_clock, tmp_path):
    fake_clock.update(slow=5.0, fast=1.0, loose=0.1)
    cands = pool(("slow", Accuracy.EXACT, exact), ("fast", Accuracy.BF16, exact), ("loose", Accuracy.INT8, exact))
    model = Model()
    report = select_kernels(model, "auto", Accuracy.BF16, KernelCache(tmp_path), cands)
    by_label = {s.label: s for s in report.shapes}
    linear = by_label[f"int8 {N}x{K} linear"]
    head = by_label[f"int8 {N}x{K} head"]
    assert set(linear.chosen.values()) == {"fast"}  # "loose" is INT8: not allowed under BF16
    assert "loose" not in linear.timings
    assert set(head.chosen.values()) == {"slow"}  # the head is held to EXACT
    assert isinstance(model.a.kernel_table, KernelTable) and model.a.kernel_table.names[0] == "fast"
    x = torch.randn(3, K)
    torch.testing.assert_close(model.a.kernel_table(x), x @ model.a.reference_weight().t())


def test_int8_accuracy_lets_the_head_take_int8_kernels(fake_clock, tmp_path):
    fake_clock.update(slow=5.0, loose=0.1)
    cands = pool(("slow", Accuracy.EXACT, exact), ("loose", Accuracy.INT8, exact))
    report = select_kernels(Model(), "auto", Accuracy.INT8, KernelCache(tmp_path), cands)
    assert all(set(s.chosen.values()) == {"loose"} for s in report.shapes)


def test_raising_wrong_and_missing_candidates_are_dropped(fake_clock, tmp_path):
    def raises(w):
        raise RuntimeError("no such op on this build")

    def wrong(w):
        return lambda x: torch.zeros(x.shape[0], N)

    def bad_shape(w):
        return lambda x: torch.zeros(x.shape[0], N + 1)

    fake_clock.update(ok=3.0)
    cands = (fake("raises", prepare=raises), fake("wrong", prepare=wrong), fake("bad_shape", prepare=bad_shape),
             fake("ok", prepare=named("ok")))
    report = select_kernels(Model(), "auto", Accuracy.EXACT, KernelCache(tmp_path), cands)
    s = report.shapes[0]
    assert set(s.dropped) == {"raises", "wrong", "bad_shape"}
    assert "no such op" in s.dropped["raises"] and "wrong values" in s.dropped["wrong"]
    assert "shape" in s.dropped["bad_shape"]
    assert set(s.chosen.values()) == {"ok"}
    assert "dropped" in report.format()


def test_no_working_candidate_is_an_error(fake_clock, tmp_path):
    def wrong(w):
        return lambda x: torch.ones(x.shape[0], N)

    with pytest.raises(RuntimeError, match="no kernel works"):
        select_kernels(Model(), "auto", Accuracy.EXACT, KernelCache(tmp_path),
                       (fake("w1", prepare=wrong), fake("w2", prepare=wrong)))


def test_row_buckets_choose_per_size(tmp_path, monkeypatch):
    # "gemv" costs 1 per row, "gemm" a fixed 10: the GEMV wins below 10 rows, the GEMM above
    def time_pass(kernels, rows, in_features, clock=None):
        return {"gemv": rows * 1.0, "gemm": 10.0}[kernels[0].candidate_name]

    monkeypatch.setattr(selector, "_time_pass", time_pass)
    model = Model()
    select_kernels(model, "auto", Accuracy.EXACT, KernelCache(tmp_path),
                   pool(("gemv", Accuracy.EXACT, exact), ("gemm", Accuracy.EXACT, exact)), buckets=(1, 4, 16, 64))
    table = model.a.kernel_table
    assert table.names == ["gemv", "gemv", "gemm", "gemm"]
    calls = []
    table.kernels = [lambda x, n=n: calls.append(n) for n in table.names]
    for rows in (1, 3, 5, 15, 16, 500):
        table(torch.zeros(rows, K))
    assert calls == ["gemv", "gemv", "gemv", "gemv", "gemm", "gemm"]


def test_cache_second_run_measures_nothing_and_is_keyed_by_machine(tmp_path, monkeypatch):
    timed: list[str] = []

    def time_pass(kernels, rows, in_features, clock=None):
        timed.append(kernels[0].candidate_name)
        return {"a": 1.0, "b": 2.0}[kernels[0].candidate_name]

    monkeypatch.setattr(selector, "_time_pass", time_pass)
    cands = pool(("a", Accuracy.EXACT, exact), ("b", Accuracy.EXACT, exact))
    select_kernels(Model(), "auto", Accuracy.EXACT, KernelCache(tmp_path), cands)
    assert timed
    timed.clear()
    report = select_kernels(Model(), "auto", Accuracy.EXACT, KernelCache(tmp_path), cands)
    assert all(s.from_cache for s in report.shapes) and timed == []
    real_key = cache_module.machine_key()
    for change in ({"cpu_model": "Other CPU"}, {"torch_version": "9.9"}, {"isa_flags": "feed"},
                   {"num_threads": real_key.num_threads + 1}, {"dispatch_env": "ATEN_CPU_CAPABILITY=avx2"}):
        other = dataclasses.replace(real_key, **change)
        monkeypatch.setattr(selector, "machine_key", lambda other=other: other)
        select_kernels(Model(), "auto", Accuracy.EXACT, KernelCache(tmp_path), cands)
        assert timed, f"{change} should have been measured again"
        timed.clear()


def test_forced_kernel_and_unknown_name(fake_clock, tmp_path):
    fake_clock.update(a=1.0, b=2.0)
    cands = pool(("a", Accuracy.EXACT, exact), ("b", Accuracy.INT8, exact))
    model = Model()
    select_kernels(model, "b", Accuracy.EXACT, KernelCache(tmp_path), cands)  # forced, whatever its accuracy
    assert set(model.head.kernel_table.names) == {"b"}
    with pytest.raises(ValueError, match="unknown kernel"):
        select_kernels(Model(), "nope", Accuracy.EXACT, KernelCache(tmp_path), cands)


def test_default_mode_installs_nothing(tmp_path):
    model = Model()
    report = select_kernels(model, "default", Accuracy.BF16, KernelCache(tmp_path))
    assert report.shapes == [] and model.a.kernel_table is None


def test_corrupt_cache_is_ignored(tmp_path):
    (tmp_path / cache_module.CACHE_FILE).write_text("{not json")
    assert KernelCache(tmp_path).entries == {}


def test_single_candidate_is_checked_once_per_machine_and_a_cached_start_writes_nothing(tmp_path):
    prepared: list[str] = []

    def counting(w):
        prepared.append("x")
        return exact(w)

    only = (fake("only", prepare=counting),)
    select_kernels(Model(), "auto", Accuracy.EXACT, KernelCache(tmp_path), only)
    path = tmp_path / cache_module.CACHE_FILE
    first, written = len(prepared), path.stat().st_mtime_ns
    assert first == 2 + 3  # a check per group (linears, head), then one install per layer
    prepared.clear()
    cache = KernelCache(tmp_path)
    report = select_kernels(Model(), "auto", Accuracy.EXACT, cache, only)
    assert len(prepared) == 3 and all(s.from_cache for s in report.shapes)  # installs only: no check
    assert not cache.changed and path.stat().st_mtime_ns == written
