"""GGUF layout walk: every count, length, type and offset in a file's header, metadata and tensor table is
proved to fit the file as it is read, and the metadata values and tensor table come back decoded.

A GGUF file (versions 2 and 3) is: the magic "GGUF", a u32 version, a u64 tensor count and a u64 metadata
count; per metadata entry a string key, a u32 value type and the value; per tensor a string name, a u32
dimension count, that many u64 dimensions (innermost first), a u32 GGML type and a u64 offset from the
aligned start of the tensor data. A string is a u64 byte length and UTF-8 bytes; an array a u32 item
type, a u64 item count and the items.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from roofline.errors import ModelLoadError

if TYPE_CHECKING:
    from gguf.constants import GGMLQuantizationType

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
_STRING, _ARRAY, _UINT32 = 8, 9, 4
# GGUFValueType -> struct format: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_SIZES = {kind: struct.calcsize("<" + fmt) for kind, fmt in _SCALAR_FORMATS.items()}
_MIN_METADATA_BYTES = 8 + 4 + 1  # an empty key, a type and the smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # an empty name, one dimension, a type and an offset


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, proved to lie within the file."""

    name: str
    ggml_type: GGMLQuantizationType
    dims: tuple[int, ...]  # innermost first, as GGUF lists them
    offset: int  # absolute: from the start of the file
    num_bytes: int


@dataclass(frozen=True)
class GGUFLayout:
    """What the walk found: the counts, where the tensor data starts, the metadata and the tensor table."""

    version: int
    num_tensors: int
    num_metadata: int
    data_offset: int  # aligned start of the tensor data
    file_size: int
    byte_order: str  # "<", or ">" for a file written big-endian
    metadata: dict[str, object]  # key -> str, int, float, bool or a list of one of them, in file order
    tensors: tuple[TensorInfo, ...]  # in file order


class _Cursor:
    """Reads fields in order, refusing any that would run past the end of the file."""

    def __init__(self, path: str, buf: mmap.mmap, size: int) -> None:
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0
        self.order = "<"  # ">" for a file written big-endian

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {message}")

    def skip(self, num_bytes: int, what: str) -> int:
        """Step over `num_bytes`; returns where they start."""
        start = self.pos
        if num_bytes > self.remaining:
            raise self.fail(f"truncated: {what} at byte {start} needs {num_bytes} bytes, past the file's "
                            f"{self.size} bytes")
        self.pos += num_bytes
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from(self.order + "I", self.buf, self.skip(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from(self.order + "Q", self.buf, self.skip(8, what))[0]

    def skip_string(self, what: str) -> int:
        """Step over a string; returns where its bytes start."""
        length = self.u64(f"the length of {what}")
        if length > self.remaining:
            raise self.fail(f"{what} at byte {self.pos} claims {length} bytes, but only {self.remaining} remain "
                            f"in the file; is it truncated or corrupt?")
        return self.skip(length, what)

    def string(self, what: str) -> bytes:
        start = self.skip_string(what)
        return self.buf[start:self.pos]

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - len(raw)} is not UTF-8 text: {raw[:40]!r}") from None


def check_layout(path: str) -> GGUFLayout:
    """Walk the file's header, metadata and tensor table; raise a one-line ModelLoadError at the first field
    that is truncated, of an unknown type, or claims more bytes than the file holds, and then at the first
    metadata text that is not UTF-8."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelLoadError(f"{path}: the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(_Cursor(path, buf, size))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _walk(cur: _Cursor) -> GGUFLayout:
    start = cur.skip(4, "the magic")
    if cur.buf[start:start + 4] != b"GGUF":
        raise cur.fail("not a GGUF file (bad magic)")
    version = cur.u32("the version")
    if version & 0xFFFF == 0:  # as gguf's reader decides: a file written on a machine of the other byte order
        cur.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"GGUF version {version} is not supported (versions {' and '.join(map(str, SUPPORTED_VERSIONS))}"
                       f" are); is the file corrupt, or from an old converter?")
    num_tensors = cur.u64("the tensor count")
    num_metadata = cur.u64("the metadata count")
    # every entry takes bytes: a count the rest of the file cannot hold is corrupt, not a loop to run
    for count, min_bytes, what in ((num_metadata, _MIN_METADATA_BYTES, "metadata entries"),
                                   (num_tensors, _MIN_TENSOR_BYTES, "tensors")):
        if count * min_bytes > cur.remaining:
            raise cur.fail(f"the header claims {count} {what}, more than the file's {cur.size} bytes can hold; "
                           f"is it corrupt?")
    alignment = DEFAULT_ALIGNMENT
    raw: dict[str, object] = {}  # texts still as bytes: one not UTF-8 is reported after the layout
    for i in range(num_metadata):
        key = cur.text(f"metadata key #{i}")
        if key in raw:
            raise cur.fail(f"metadata key {key!r} appears twice")
        value_type = cur.u32(f"the type of metadata {key!r}")
        if key == ALIGNMENT_KEY:
            raw[key] = alignment = _alignment(cur, value_type)
        else:
            raw[key] = _read_value(cur, value_type, f"metadata {key!r}")
    entries: dict[str, TensorInfo] = {}  # offsets still from the start of the tensor data
    for i in range(num_tensors):
        entry = _tensor_info(cur, i, alignment)
        if entry.name in entries:
            raise cur.fail(f"tensor {entry.name!r} appears twice")
        entries[entry.name] = entry
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = tuple(replace(e, offset=data_offset + e.offset) for e in entries.values())
    for t in tensors:
        end = t.offset + t.num_bytes
        if end > cur.size:
            raise cur.fail(f"truncated: tensor {t.name!r} ends at byte {end}, past the file's {cur.size} bytes")
    metadata = {key: _decode(cur, key, value) for key, value in raw.items()}
    return GGUFLayout(version, num_tensors, num_metadata, data_offset, cur.size, cur.order, metadata, tensors)


def _alignment(cur: _Cursor, value_type: int) -> int:
    if value_type != _UINT32:
        raise cur.fail(f"metadata {ALIGNMENT_KEY!r} has value type {value_type}; it must be a u32")
    alignment = cur.u32(f"metadata {ALIGNMENT_KEY!r}")
    if alignment == 0 or alignment & (alignment - 1):
        raise cur.fail(f"metadata {ALIGNMENT_KEY!r} is {alignment}; it must be a power of two")
    return alignment


def _read_value(cur: _Cursor, value_type: int, what: str) -> object:
    """A metadata value; texts (alone or in an array) as their bytes."""
    if value_type == _STRING:
        return cur.string(what)
    if value_type in _SCALAR_FORMATS:
        start = cur.skip(_SCALAR_SIZES[value_type], what)
        return struct.unpack_from(cur.order + _SCALAR_FORMATS[value_type], cur.buf, start)[0]
    if value_type == _ARRAY:
        item_type = cur.u32(f"the item type of {what}")
        count = cur.u64(f"the length of {what}")
        if item_type == _ARRAY:
            raise cur.fail(f"{what} is an array of arrays, which GGUF readers do not support")
        if item_type != _STRING and item_type not in _SCALAR_SIZES:
            raise cur.fail(f"{what} is an array of unknown value type {item_type}")
        item_bytes = 8 if item_type == _STRING else _SCALAR_SIZES[item_type]  # a string takes at least its length
        if count * item_bytes > cur.remaining:
            raise cur.fail(f"{what} at byte {cur.pos} claims {count} items, more than the {cur.remaining} bytes "
                           f"left in the file can hold; is it truncated or corrupt?")
        if item_type == _STRING:
            return _read_strings(cur, count, what)
        start = cur.skip(count * item_bytes, what)
        # one unpack for the whole array: e.g. 49k token types or scores in well under a millisecond
        return list(struct.unpack_from(f"{cur.order}{count}{_SCALAR_FORMATS[item_type]}", cur.buf, start))
    raise cur.fail(f"{what} has unknown value type {value_type}")


def _read_strings(cur: _Cursor, count: int, what: str) -> list[bytes]:
    """`count` strings as bytes: the vocabulary's and merges' 100k+ in a tight loop, the cursor's messages on
    failure."""
    unpack, buf, size, pos = struct.Struct(cur.order + "Q").unpack_from, cur.buf, cur.size, cur.pos
    items: list[bytes] = []
    append = items.append
    for i in range(count):
        start = pos + 8
        if start > size or (end := start + unpack(buf, pos)[0]) > size:
            cur.pos = pos
            cur.skip_string(f"item {i} of {what}")  # raises, saying which limit was passed
        append(buf[start:end])
        pos = end
    cur.pos = pos
    return items


def _decode(cur: _Cursor, key: str, value: object) -> object:
    """A metadata value with its texts decoded from UTF-8."""
    try:
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return list(map(bytes.decode, value))  # UTF-8, strict: one C loop over the vocabulary
    except UnicodeDecodeError as exc:
        raise cur.fail(f"metadata key {key!r} is unreadable ({exc})") from None
    return value


def _tensor_info(cur: _Cursor, index: int, alignment: int) -> TensorInfo:
    """One tensor table entry, its offset still from the start of the tensor data."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    name = cur.text(f"the name of tensor #{index}")
    num_dims = cur.u32(f"the dimension count of tensor {name!r}")
    if not 1 <= num_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {num_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    dims = [cur.u64(f"the dimensions of tensor {name!r}") for _ in range(num_dims)]
    raw_type = cur.u32(f"the type of tensor {name!r}")
    offset = cur.u64(f"the data offset of tensor {name!r}")
    if any(d == 0 or d >= 2**63 for d in dims):
        raise cur.fail(f"tensor {name!r} has dimensions {dims}; each must be between 1 and 2**63 - 1")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown GGML type {raw_type}") from None
    if dims[0] % block_size:
        raise cur.fail(f"tensor {name!r} has rows of {dims[0]} values, not whole {ggml_type.name} blocks of "
                       f"{block_size}")
    if offset % alignment:
        raise cur.fail(f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment {alignment}")
    return TensorInfo(name, ggml_type, tuple(dims), offset, math.prod(dims) // block_size * block_bytes)
