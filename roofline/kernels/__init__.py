"""Matmul kernels chosen by measurement on the running machine (docs/quantization.md, "Kernels")."""

from roofline.kernels.cache import KernelCache, MachineKey, machine_key
from roofline.kernels.candidates import CANDIDATES, Accuracy, KernelCandidate, KernelUnavailable, LowBitWeights
from roofline.kernels.selector import ROW_BUCKETS, KernelReport, KernelTable, low_bit_modules, select_kernels

__all__ = ["CANDIDATES", "ROW_BUCKETS", "Accuracy", "KernelCache", "KernelCandidate", "KernelReport", "KernelTable",
           "KernelUnavailable", "LowBitWeights", "MachineKey", "low_bit_modules", "machine_key", "select_kernels"]
