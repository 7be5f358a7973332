"""`roofline calibrate`: measure this machine's bandwidths and FLOP/s with torch and save a profile."""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from roofline.calibrate.curves import CURVE_WIDTHS, QUICK_CURVE_WIDTHS
from roofline.calibrate.runtime import measure_runtime
from roofline.planner.timing import best_time
from roofline.planner.profile import CalibrationProfile

MB = 1 << 20
FP32_BYTES = 4
HALF_BYTES = 2
DISK_CHUNK = 8 * MB  # read/write buffer of the disk test
TINY_OPS = 2000  # ops timed by the overhead test
TINY_ELEMENTS = 576  # a small hidden size: the op is all overhead


@dataclass(frozen=True)
class CalibrationSizes:
    """Problem sizes and time budgets of one calibration run."""

    stream_bytes: int  # tensor size of the read/copy tests (well past the last-level cache)
    gemv_bytes: int  # total size of the matrices of the GEMV test
    gemv_rows: int  # rows of each GEMV matrix
    matmul_n: int  # square matmul size for fp32 (and half precision on a GPU)
    cpu_half_matmul_n: int  # bf16 matmuls on a CPU are often slow: a smaller size
    h2d_bytes: int  # pinned host->device copy
    disk_bytes: int  # size of the temporary file read back
    repeats: int  # timed repetitions (best is kept)
    budget_s: float  # stop repeating a test after this long
    curve_bytes: int  # weights of each matmul-curve width (past the cache, as a model's are)


def calibration_sizes(is_quick: bool) -> CalibrationSizes:
    """Sizes for the default run (about a minute on a 2-core CPU) or a --quick one (about ten seconds)."""
    if is_quick:
        return CalibrationSizes(64 * MB, 64 * MB, 1024, 512, 256, 32 * MB, 16 * MB, 3, 0.5, 16 * MB)
    return CalibrationSizes(512 * MB, 512 * MB, 4096, 2048, 1024, 256 * MB, 256 * MB, 5, 3.0, 128 * MB)


def measure_stream(device: str, num_bytes: int, sizes: CalibrationSizes, sync) -> tuple[float, float]:
    """(read bytes/s of a large sum, read+write bytes/s of a large copy)."""
    import torch

    source = torch.ones(num_bytes // FP32_BYTES, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    read_s = best_time(lambda: source.sum(), sync, sizes.repeats, sizes.budget_s)
    copy_s = best_time(lambda: target.copy_(source), sync, sizes.repeats, sizes.budget_s)
    return num_bytes / read_s, 2 * num_bytes / copy_s


def measure_gemv(device: str, dtype, sizes: CalibrationSizes, sync) -> float:
    """Bytes/s of matrix-vector products over many matrices, the access pattern of batch-1 decode."""
    import torch

    element_bytes = torch.finfo(dtype).bits // 8
    cols = sizes.gemv_rows
    num_matrices = max(1, sizes.gemv_bytes // (sizes.gemv_rows * cols * element_bytes))
    # [rows, cols] each; values do not matter for timing, only that they are not denormal.
    matrices = [torch.full((sizes.gemv_rows, cols), 0.5, dtype=dtype, device=device) for _ in range(num_matrices)]
    vector = torch.full((cols,), 0.5, dtype=dtype, device=device)  # [cols]

    def run() -> None:
        for matrix in matrices:
            torch.mv(matrix, vector)

    seconds = best_time(run, sync, sizes.repeats, sizes.budget_s)
    return num_matrices * sizes.gemv_rows * cols * element_bytes / seconds


def measure_matmul(device: str, dtype, n: int, sizes: CalibrationSizes, sync) -> float:
    """FLOP/s of an n x n x n matmul in dtype."""
    import torch

    a = torch.full((n, n), 0.5, dtype=dtype, device=device)
    b = torch.full((n, n), 0.5, dtype=dtype, device=device)
    seconds = best_time(lambda: a @ b, sync, sizes.repeats, sizes.budget_s)
    return 2 * n**3 / seconds


def measure_op_overhead(device: str, sizes: CalibrationSizes, sync) -> float:
    """Seconds per tiny elementwise op: framework dispatch (CPU) or kernel launch (GPU)."""
    import torch

    x = torch.full((TINY_ELEMENTS,), 0.5, device=device)

    def run() -> None:
        for _ in range(TINY_OPS):
            torch.mul(x, x)

    return best_time(run, sync, sizes.repeats, sizes.budget_s) / TINY_OPS


def measure_h2d(num_bytes: int, sizes: CalibrationSizes, sync) -> float:
    """Bytes/s of a pinned host-to-device copy."""
    import torch

    host = torch.ones(num_bytes // FP32_BYTES, dtype=torch.float32).pin_memory()
    device = torch.empty(host.shape, dtype=host.dtype, device="cuda")
    return num_bytes / best_time(lambda: device.copy_(host, non_blocking=True), sync,
                                  sizes.repeats, sizes.budget_s)


def measure_disk(directory: Path, num_bytes: int) -> tuple[float, list[str]]:
    """Bytes/s of a sequential read of a fresh file, dropped from the page cache first; and caveats."""
    notes: list[str] = []
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(DISK_CHUNK)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="roofline-disk-") as handle:
        for _ in range(max(1, num_bytes // DISK_CHUNK)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            notes.append("no posix_fadvise: the disk figure may include the page cache")
        buffer = bytearray(DISK_CHUNK)
        total, begin = 0, time.perf_counter()
        with open(handle.name, "rb", buffering=0) as reader:
            while count := reader.readinto(buffer):
                total += count
        return total / (time.perf_counter() - begin), notes


def _physical_memory() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def calibrate(is_quick: bool = False, disk_dir: Path | None = None) -> CalibrationProfile:
    """Measure this machine: the GPU when CUDA is available, else the CPU, with torch's thread count."""
    import torch

    sizes = calibration_sizes(is_quick)
    disk_dir = disk_dir or Path(tempfile.gettempdir())
    notes: list[str] = []
    is_gpu = torch.cuda.is_available()
    device = "cuda" if is_gpu else "cpu"
    sync = torch.cuda.synchronize if is_gpu else (lambda: None)
    read_bw, copy_bw = measure_stream(device, sizes.stream_bytes, sizes, sync)
    flops = {"fp32": measure_matmul(device, torch.float32, sizes.matmul_n, sizes, sync)}
    if is_gpu:
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            flops[name] = measure_matmul(device, dtype, 2 * sizes.matmul_n, sizes, sync)
        gemv_bw = measure_gemv(device, torch.bfloat16, sizes, sync)
        host_read_bw, _ = measure_stream("cpu", sizes.stream_bytes, sizes, lambda: None)
        properties = torch.cuda.get_device_properties(0)
        memory, name = float(properties.total_memory), f"cuda: {properties.name}"
        h2d = measure_h2d(sizes.h2d_bytes, sizes, sync)
    else:
        flops["bf16"] = measure_matmul(device, torch.bfloat16, sizes.cpu_half_matmul_n, sizes, sync)
        if flops["bf16"] < flops["fp32"]:
            notes.append("bf16 matmuls are slower than fp32 on this CPU")
        gemv_bw = measure_gemv(device, torch.float32, sizes, sync)
        host_read_bw, memory, name, h2d = None, _physical_memory(), "cpu", None
    op_overhead = measure_op_overhead(device, sizes, sync)
    # The dtype the runtime computes in here: fp32 on a CPU, bf16 on a GPU.
    dtype_name, dtype = ("bf16", torch.bfloat16) if is_gpu else ("fp32", torch.float32)
    runtime = measure_runtime(device, dtype, dtype_name, sizes.curve_bytes, sync, sizes.repeats, sizes.budget_s,
                              QUICK_CURVE_WIDTHS if is_quick else CURVE_WIDTHS)
    disk_bw, disk_notes = measure_disk(disk_dir, sizes.disk_bytes)
    return CalibrationProfile(
        device=name, num_threads=torch.get_num_threads(), memory_bytes=memory,
        read_bandwidth=read_bw, copy_bandwidth=copy_bw, gemv_bandwidth=gemv_bw, matmul_flops=flops,
        disk_bandwidth=disk_bw, op_overhead_s=op_overhead, host_link_bandwidth=h2d,
        runtime=asdict(runtime),
        host_memory_bytes=_physical_memory() if is_gpu else 0.0, host_bandwidth=host_read_bw,
        is_quick=is_quick, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        notes=notes + disk_notes)
