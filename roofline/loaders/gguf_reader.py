"""GGUF reader: a file's metadata as Python values and its tensors as zero-copy views of one memory map.

It takes the place of the `gguf` package's GGUFReader (the package stays for its constants and its
dequantization). GGUFReader's constructor makes a numpy memmap view of every part of every metadata
field: for the default model (SmolLM2-135M Q4_1, a 49,152-token vocabulary and 48,900 merges) that is
~1.2 million views and 3.6 s, before a single value is decoded. The layout walk (`gguf_layout`), which
proves every field fits the file, decodes the same values as it goes in ~30 ms (best of 3; ~0.1 s the first
time in a fresh process; AMD EPYC, one thread, 2026-12-02).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from roofline.loaders.gguf_layout import GGUFLayout, TensorInfo, check_layout

if TYPE_CHECKING:
    from gguf.constants import GGMLQuantizationType

# the GGML types GGUFReader views as numbers; every other type stays as its blocks' bytes
_NUMBER_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: its table entry and its bytes, viewed as gguf's GGUFReader views them (the field names are
    its ReaderTensor's, which the planner reads)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # dims innermost first, as GGUF lists them
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute: from the start of the file
    data: np.ndarray  # float/int types: [outermost, ..., innermost] of that dtype; others: uint8 [..., bytes per row]


@dataclass(frozen=True)
class GGUFContents:
    """A GGUF file read: its layout, metadata and tensors, all tensors views of `data`."""

    layout: GGUFLayout
    metadata: dict[str, object]  # key -> str, int, float, bool or a list of one of them, in file order
    tensors: list[GGUFTensor]  # in file order
    data: np.memmap  # the whole file, read-only


def read_gguf(path: str) -> GGUFContents:
    """Walk and check the file's layout (a one-line ModelLoadError on damage), then map its tensor data."""
    layout = check_layout(path)
    data = np.memmap(path, mode="r")
    # plain ndarray views of the map: a memmap subclass runs memmap.__array_finalize__ on every slice, and
    # gguf's dequantization slices each tensor into many (the default model to fp32: ~740 ms
    # through memmaps, ~530 ms through ndarrays)
    file_bytes = data.view(np.ndarray)
    tensors = [_tensor(file_bytes, info, layout.byte_order) for info in layout.tensors]
    return GGUFContents(layout, layout.metadata, tensors, data)


def _tensor(file_bytes: np.ndarray, info: TensorInfo, byte_order: str) -> GGUFTensor:
    num_elements = math.prod(info.dims)
    shape = tuple(reversed(info.dims))  # [outermost, ..., innermost]
    view = file_bytes[info.offset:info.offset + info.num_bytes]
    dtype = _NUMBER_TYPES.get(info.ggml_type.name)
    if dtype is not None:
        view = view.view(np.dtype(dtype).newbyteorder(byte_order)).reshape(shape)
    else:  # whole blocks per row (the layout walk checked): a row's bytes are the total over the rows
        view = view.reshape(*shape[:-1], info.num_bytes // (num_elements // info.dims[0]))
    return GGUFTensor(info.name, info.ggml_type, info.dims, num_elements, info.num_bytes, info.offset, view)
