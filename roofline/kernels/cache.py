"""Where kernel measurements are kept between starts, keyed by the machine they were taken on.

A measurement is only valid on the CPU, instruction-set flags, torch build and thread count that
produced it; each is part of the key, so moving the cache to another machine (or upgrading torch)
makes the selector measure again rather than trust foreign numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("roofline")

CACHE_FILE = "kernels-v1.json"
DISPATCH_ENV = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA")  # change which code torch and oneDNN run


@dataclass(frozen=True)
class MachineKey:
    """What a kernel timing depends on besides the shape."""

    cpu_model: str
    isa_flags: str  # hash of the CPU's feature flags
    cpu_capability: str  # torch's dispatch level on this run (AVX512, AVX2, ...)
    dispatch_env: str  # the dispatch overrides set for this process
    torch_version: str
    num_threads: int

    def describe(self) -> str:
        """One line naming the machine, e.g. for `roofline kernels`."""
        env = f", {self.dispatch_env}" if self.dispatch_env else ""
        return (f"{self.cpu_model}; torch {self.torch_version} dispatching {self.cpu_capability}{env}; "
                f"{self.num_threads} threads")


def _cpuinfo() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return model, flags


def machine_key() -> MachineKey:
    """The key of the running process: CPU, flags, torch dispatch and version, threads."""
    model, flags = _cpuinfo()
    env = " ".join(f"{k}={os.environ[k]}" for k in DISPATCH_ENV if os.environ.get(k))
    return MachineKey(cpu_model=model, isa_flags=hashlib.sha256(flags.encode()).hexdigest()[:16],
                      cpu_capability=torch.backends.cpu.get_cpu_capability(), dispatch_env=env,
                      torch_version=torch.__version__, num_threads=torch.get_num_threads())


def default_cache_dir() -> Path:
    """$ROOFLINE_CACHE_DIR, else $XDG_CACHE_HOME/roofline, else ~/.cache/roofline."""
    if os.environ.get("ROOFLINE_CACHE_DIR"):
        return Path(os.environ["ROOFLINE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "roofline"


class KernelCache:
    """A JSON file of timings: entry key (machine + shape + candidate) -> {row bucket: microseconds} or an error."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = (directory or default_cache_dir()) / CACHE_FILE
        self.entries: dict[str, dict] = {}
        self.changed = False  # whether put() added anything since the file was read or written
        try:
            self.entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # a corrupt cache costs a re-measurement, never a failed start
            logger.warning("ignoring unreadable kernel cache %s (%s)", self.path, exc)

    @staticmethod
    def key(machine: MachineKey, shape: str, candidate: str) -> str:
        """The entry key for one candidate on one shape on this machine."""
        return "|".join([machine.cpu_model, machine.isa_flags, machine.cpu_capability, machine.dispatch_env,
                         machine.torch_version, str(machine.num_threads), shape, candidate])

    def get(self, key: str) -> dict | None:
        """The stored entry, or None."""
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        """Store an entry (written by `save`)."""
        if self.entries.get(key) != entry:
            self.entries[key] = entry
            self.changed = True

    def save(self) -> None:
        """Write the file atomically if anything changed; a read-only cache directory only costs a warning."""
        if not self.changed:  # a start served from the cache writes nothing
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
            tmp.replace(self.path)
            self.changed = False
        except OSError as exc:
            logger.warning("could not write the kernel cache %s (%s)", self.path, exc)
