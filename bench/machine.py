"""What every benchmark prints about the machine: the CPU model and the instruction-set features that decide
the kernels (scripts here run as `python bench/NAME.py`, so they import this as `machine`)."""

from __future__ import annotations

import platform
import subprocess

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_name() -> str:
    """lscpu's model name and the ISA flags present, e.g. 'AMD EPYC (avx2 avx512f avx512_vnni avx512_bf16)'."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    isa = [f for f in ISA_FLAGS if f in flags]
    return f"{fields.get('Model name', '?').strip()} ({' '.join(isa) or 'no AVX2'})"
