"""Our GGUF reader against the `gguf` package's GGUFReader (the reference, in this file only): the same
metadata values of the same Python types, and every tensor's type, shape, offset and bytes, for the default
model and for tiny files holding every value type, many tensor types, both byte orders and a custom alignment.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from roofline.errors import ModelLoadError
from roofline.loaders import default_model_path
from roofline.loaders.gguf_reader import GGUFContents, read_gguf


def _typed(value: object) -> object:
    """A metadata value with each item's type beside it: True == 1 and 1 == 1.0 must not pass for equal."""
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return type(value).__name__, value


def assert_same_as_gguf_reader(path: str) -> GGUFContents:
    """Our reader and gguf's agree on the metadata (values, types, order) and on every tensor."""
    from gguf import GGUFReader

    ours, ref = read_gguf(path), GGUFReader(path)
    ref_metadata = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_metadata)
    for key, value in ref_metadata.items():
        assert _typed(ours.metadata[key]) == _typed(value), key
    assert ours.layout.data_offset == ref.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    base = ours.data.ctypes.data
    for t, r in zip(ours.tensors, ref.tensors):
        assert (t.tensor_type, list(t.shape), t.n_elements, t.n_bytes, t.data_offset) == (
            r.tensor_type, r.shape.tolist(), r.n_elements, r.n_bytes, r.data_offset), t.name
        assert (t.data.dtype, t.data.shape) == (r.data.dtype, r.data.shape), t.name
        assert t.data.tobytes() == r.data.tobytes(), t.name
        assert t.data.ctypes.data - base == t.data_offset and not t.data.flags.writeable  # a view of the map
    return ours


def test_default_model_reads_as_gguf_reader_reads_it():
    contents = assert_same_as_gguf_reader(default_model_path())
    assert len(contents.metadata["tokenizer.ggml.tokens"]) == 49152
    assert {t.tensor_type.name for t in contents.tensors} == {"F32", "Q4_1", "Q8_0"}


# ---- tiny files written here ----

def _write_tiny(path: str, big_endian: bool = False, alignment: int | None = None) -> None:
    """Every metadata value type (scalars, arrays, texts beyond ASCII) and tensors of float, int,
    quantized and raw-block types in 1 to 4 dimensions."""
    import gguf
    from gguf import GGMLQuantizationType as Q, GGUFValueType as V, quants

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    scalars = {V.UINT8: 200, V.INT8: -100, V.UINT16: 60000, V.INT16: -30000, V.UINT32: 4_000_000_000,
               V.INT32: -2_000_000_000, V.FLOAT32: 0.1, V.BOOL: True, V.UINT64: 2**63 + 5, V.INT64: -(2**62),
               V.FLOAT64: math.pi, V.STRING: "héllo ▁wörld 🙂"}
    for kind, value in scalars.items():
        w.add_key_value(f"test.{kind.name.lower()}", value, kind)
        sub = [value, value] if kind != V.BOOL else [True, False, True]
        w.add_key_value(f"test.array.{kind.name.lower()}", sub, V.ARRAY, kind)
    w.add_key_value("test.bool_false", False, V.BOOL)
    w.add_key_value("test.array.texts", ["", "a b", "Ġthe", "\n", "日本語", "x" * 300], V.ARRAY, V.STRING)
    w.add_key_value("test.array.floats", rng.standard_normal(1000).astype(np.float32).tolist(), V.ARRAY, V.FLOAT32)
    w.add_tensor("f32.4d", rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    w.add_tensor("f16.2d", rng.standard_normal((3, 8)).astype(np.float16))
    w.add_tensor("f64.1d", rng.standard_normal(7))
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        w.add_tensor(f"{np.dtype(dtype).name}.2d", rng.integers(-100, 100, (2, 6)).astype(dtype))
    values = rng.standard_normal((6, 256)).astype(np.float32)
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16):
        w.add_tensor(f"{qtype.name}.2d", quants.quantize(values, qtype), raw_dtype=qtype)
    w.add_tensor("Q8_0.3d", quants.quantize(values.reshape(2, 3, 256), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("Q4_0.1d", quants.quantize(values[0], Q.Q4_0), raw_dtype=Q.Q4_0)
    for qtype in (Q.Q4_K, Q.Q6_K):  # no quantizer in gguf: any bytes make whole blocks
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        w.add_tensor(f"{qtype.name}.2d", rng.integers(0, 256, (4, block_bytes), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("big_endian, alignment", [(False, None), (True, None), (False, 128)])
def test_tiny_file_reads_as_gguf_reader_reads_it(tmp_path, big_endian, alignment):
    path = str(tmp_path / "tiny.gguf")
    _write_tiny(path, big_endian, alignment)
    contents = assert_same_as_gguf_reader(path)
    assert contents.layout.byte_order == (">" if big_endian else "<")
    assert contents.metadata["test.string"] == "héllo ▁wörld 🙂"
    assert contents.metadata["test.array.bool"] == [True, False, True]
    assert all(t.data_offset % (alignment or 32) == 0 for t in contents.tensors)
    if alignment is not None:
        assert contents.metadata["general.alignment"] == alignment


def test_empty_arrays_read_as_gguf_reader_reads_them(tmp_path):
    """Written by hand: GGUFWriter refuses empty arrays, yet a file may hold them."""
    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    string, array, int32 = 8, 9, 5  # GGUFValueType
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
                     + text("test.empty_strings") + struct.pack("<IIQ", array, string, 0)
                     + text("test.empty_ints") + struct.pack("<IIQ", array, int32, 0))
    contents = assert_same_as_gguf_reader(str(path))
    assert contents.metadata == {"test.empty_strings": [], "test.empty_ints": []} and contents.tensors == []


@pytest.mark.parametrize("key, text", [("test.string", b"h\xc3\xa9llo"), ("test.array.texts", b"\xe6\x97\xa5")])
def test_text_that_is_not_utf8_is_reported_as_before(tmp_path, key, text):
    """The message names the key and carries the decode error gguf's reader raises for the same bytes."""
    from gguf import GGUFReader

    good = tmp_path / "good.gguf"
    _write_tiny(str(good))
    data = good.read_bytes()
    at = data.index(text)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    with pytest.raises(UnicodeDecodeError) as ref:
        GGUFReader(bad).fields[key].contents()
    with pytest.raises(ModelLoadError) as ours:
        read_gguf(str(bad))
    assert str(ours.value) == f"{bad}: metadata key {key!r} is unreadable ({ref.value})"
