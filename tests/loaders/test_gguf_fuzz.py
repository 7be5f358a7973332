"""The GGUF loader against 150 seeded mutations of a tiny valid file: byte flips in the header, truncations,
absurd length and count fields, and rewrites with keys missing, of the wrong type or value, and tensors
missing or misshapen. Each file loads, or fails with a one-line ModelLoadError naming it; no other
exception, no hang and no absurd allocation.
"""

from __future__ import annotations

import contextlib
import random
import resource
import signal
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from roofline.cli import main
from roofline.config import DeviceConfig, EngineConfig
from roofline.engine.model_runner import ModelRunner
from roofline.errors import ModelLoadError
from roofline.loaders import open_model
from roofline.loaders.gguf_layout import check_layout

from test_gguf import write_gguf

SEED = 17
NUM_FLIPS, NUM_TRUNCATIONS, NUM_FIELD_WRITES = 32, 20, 21
DEADLINE_S = 5  # far above a good load (~20 ms): only a hang reaches it
MAX_RSS_GROWTH = 512 << 20  # the tiny model needs a few MiB; a length taken at its word needs GiB
ARCH = "llama"
U64_VALUES = (2**63, 2**40, 2**32, 2**64 - 1, 2**31, 0, 1)
U32_VALUES = (2**32 - 1, 2**31, 0, 1, 7, 255)


# ---- the valid file and what a mutation needs to know of it ----

@dataclass
class KV:
    """One metadata entry as GGUFWriter takes it."""

    value: object
    type: object  # GGUFValueType
    sub_type: object = None  # the item type of an array


@dataclass
class Tensor:
    """One tensor as GGUFWriter takes it: a float array, or uint8 blocks with their GGML type."""

    data: np.ndarray
    raw_type: object = None  # GGMLQuantizationType of uint8 blocks; None for float arrays


@dataclass(frozen=True)
class Field:
    """A length, count, dimension, offset or type field of the file."""

    kind: str  # e.g. "array length", "tensor dim"
    owner: str  # the metadata key or tensor it belongs to ("" for the header's counts)
    offset: int
    width: int  # 4 (u32) or 8 (u64)


@dataclass
class BaseFile:
    """The valid file's bytes and parsed parts."""

    data: bytes
    data_offset: int  # where tensor data starts: everything before is header, metadata, tensor table
    fields: dict[str, list[Field]]  # by kind
    kv: dict[str, KV]
    tensors: dict[str, Tensor]

    def field(self, kind: str, owner: str = "") -> Field:
        return next(f for f in self.fields[kind] if f.owner == owner)


def _parse(path: Path) -> BaseFile:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    start = reader.data.ctypes.data

    def at(part: np.ndarray) -> int:  # every part gguf returns is a view into the file's memory map
        return part.ctypes.data - start

    fields: dict[str, list[Field]] = defaultdict(list)

    def add(kind: str, owner: str, part: np.ndarray, width: int = 8, index: int = 0) -> None:
        fields[kind].append(Field(kind, owner, at(part) + index * width, width))

    kv: dict[str, KV] = {}
    for name, f in reader.fields.items():
        if name in ("GGUF.tensor_count", "GGUF.kv_count"):
            add(name, "", f.parts[0])
        if name.startswith("GGUF."):
            continue
        add("key length", name, f.parts[0])
        add("value type", name, f.parts[2], 4)
        kind = f.types[0]
        if kind == GGUFValueType.STRING:
            add("string length", name, f.parts[3])
        elif kind == GGUFValueType.ARRAY:
            add("array item type", name, f.parts[3], 4)
            add("array length", name, f.parts[4])
            if f.types[-1] == GGUFValueType.STRING:
                for i in f.data:
                    add("array string length", name, f.parts[i - 1])
        kv[name] = KV(f.contents(), kind, f.types[-1] if kind == GGUFValueType.ARRAY else None)
    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        name_len, _, n_dims, dims, raw_type, offset = t.field.parts
        add("tensor name length", t.name, name_len)
        add("tensor n_dims", t.name, n_dims, 4)
        for i in range(len(dims)):
            add("tensor dim", t.name, dims, index=i)
        add("tensor type", t.name, raw_type, 4)
        add("tensor offset", t.name, offset)
        is_float = t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        tensors[t.name] = Tensor(np.array(t.data), None if is_float else t.tensor_type)
    return BaseFile(path.read_bytes(), reader.data_offset, dict(fields), kv, tensors)


@pytest.fixture(scope="module")
def base(tmp_path_factory, reference) -> BaseFile:
    """A tiny llama (biased q/k/v, untied head, linear rope) with Q8_0 weights and a 512-token vocabulary."""
    from gguf import GGMLQuantizationType

    path = tmp_path_factory.mktemp("fuzz") / "base.gguf"
    write_gguf(reference.build_hf_model(reference.specs["llama-mha-bias-linear-rope"]), str(path),
               GGMLQuantizationType.Q8_0)
    return _parse(path)


def _write(path: Path, kv: dict[str, KV], tensors: dict[str, Tensor]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), ARCH)
    w.kv_data[0].clear()  # drop the writer's own general.architecture: `kv` says what the file holds
    for key, entry in kv.items():
        w.add_key_value(key, entry.value, entry.type, entry.sub_type)
    for name, t in tensors.items():
        w.add_tensor(name, t.data, raw_dtype=t.raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- byte-level mutations ----

def _flip(base: BaseFile, rng: random.Random) -> bytes:
    """1-3 bytes XORed, in a length/count/type field or anywhere before the tensor data."""
    data = bytearray(base.data)
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            field = rng.choice(rng.choice(list(base.fields.values())))
            offset = field.offset + rng.randrange(field.width)
        else:
            offset = rng.randrange(base.data_offset)
        data[offset] ^= rng.randint(1, 255)
    return bytes(data)


def _truncate(base: BaseFile, rng: random.Random) -> bytes:
    """The file cut short, within the header half the time."""
    end = base.data_offset if rng.random() < 0.5 else len(base.data)
    return base.data[:rng.randrange(end)]


def _overwrite_field(base: BaseFile, rng: random.Random) -> bytes:
    """One length, count, dimension, offset or type field set to an absurd value."""
    field = rng.choice(base.fields[rng.choice(sorted(base.fields))])
    if field.width == 8:
        value = rng.choice(U64_VALUES + (len(base.data), rng.getrandbits(64)))
    else:
        value = rng.choice(U32_VALUES + (rng.getrandbits(32),))
    return _patch(base.data, [(field, value)])


def _patch(data: bytes, writes: list[tuple[Field, int]]) -> bytes:
    out = bytearray(data)
    for field, value in writes:
        struct.pack_into("<Q" if field.width == 8 else "<I", out, field.offset, value)
    return bytes(out)


_HEADER_VERSION = Field("version", "", 4, 4)
# (kind, owner, value) writes: the fields whose absurd values a loader taking them at their word would
# loop on (an array of 2**40 one-byte items) or allocate for
TARGETED_WRITES: dict[str, list[tuple[str, str, int]]] = {
    "kv-count-2**40": [("GGUF.kv_count", "", 2**40)],
    "tensor-count-2**63": [("GGUF.tensor_count", "", 2**63)],
    "key-length-2**63": [("key length", "general.architecture", 2**63)],
    "string-length-2**40": [("string length", "tokenizer.ggml.model", 2**40)],
    "tokens-length-2**40": [("array length", "tokenizer.ggml.tokens", 2**40)],
    "token-type-length-2**63": [("array length", "tokenizer.ggml.token_type", 2**63)],
    "u8-token-types-2**40": [("array item type", "tokenizer.ggml.token_type", 0),  # GGUFValueType.UINT8
                             ("array length", "tokenizer.ggml.token_type", 2**40)],
    "token-length-2**40": [("array string length", "tokenizer.ggml.tokens", 2**40)],
    "tensor-name-length-2**40": [("tensor name length", "blk.0.attn_q.weight", 2**40)],
    "tensor-dims-2**31": [("tensor n_dims", "blk.0.attn_q.weight", 2**31)],
    "tensor-dim-2**40": [("tensor dim", "blk.0.attn_q.weight", 2**40)],
    "tensor-offset-2**40": [("tensor offset", "output.weight", 2**40)],
    "tensor-type-2**31": [("tensor type", "token_embd.weight", 2**31)],
}


def _targeted(case: str, base: BaseFile) -> bytes:
    if case == "version-1":
        return _patch(base.data, [(_HEADER_VERSION, 1)])
    if case == "magic-ggml":
        return b"GGML" + base.data[4:]
    return _patch(base.data, [(base.field(kind, owner), value) for kind, owner, value in TARGETED_WRITES[case]])


# ---- semantic mutations: the file rewritten with one thing wrong ----

Edit = Callable[[dict[str, KV], dict[str, Tensor]], None]


def _set(key: str, value, kind: str, sub: str | None = None) -> Edit:
    def edit(kv: dict[str, KV], tensors: dict[str, Tensor]) -> None:
        from gguf import GGUFValueType

        kv[key] = KV(value, GGUFValueType[kind], GGUFValueType[sub] if sub else None)
    return edit


def _drop(key: str) -> Edit:
    return lambda kv, tensors: kv.pop(key)


def _drop_tensor(name: str) -> Edit:
    return lambda kv, tensors: tensors.pop(name)


def _set_tensor(name: str, data: np.ndarray, raw_type: str | None = None) -> Edit:
    def edit(kv: dict[str, KV], tensors: dict[str, Tensor]) -> None:
        from gguf import GGMLQuantizationType, quants

        if raw_type is None:
            tensors[name] = Tensor(data)
        else:
            qtype = GGMLQuantizationType[raw_type]
            tensors[name] = Tensor(quants.quantize(data, qtype), qtype)
    return edit


def _rename_tensor(old: str, new: str) -> Edit:
    return lambda kv, tensors: tensors.__setitem__(new, tensors.pop(old))


def _resize_array(key: str, length: int) -> Edit:
    def edit(kv: dict[str, KV], tensors: dict[str, Tensor]) -> None:
        values = kv[key].value
        kv[key].value = (values * (length // len(values) + 1))[:length]
    return edit


def _tokens(length: int) -> Edit:
    return _set("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, length)],
                "ARRAY", "STRING")


_A = f"{ARCH}."
SEMANTIC: dict[str, Edit] = {
    # required keys missing
    "no-architecture": _drop("general.architecture"),
    "no-block-count": _drop(_A + "block_count"),
    "no-embedding-length": _drop(_A + "embedding_length"),
    "no-head-count": _drop(_A + "attention.head_count"),
    "no-ffn-length": _drop(_A + "feed_forward_length"),
    "no-vocab-size": _drop(_A + "vocab_size"),
    "no-tokens": _drop("tokenizer.ggml.tokens"),
    "no-tokenizer-model": _drop("tokenizer.ggml.model"),
    # keys of the wrong type
    "architecture-int": _set("general.architecture", 7, "UINT32"),
    "block-count-string": _set(_A + "block_count", "two", "STRING"),
    "embedding-length-float": _set(_A + "embedding_length", 64.5, "FLOAT32"),
    "head-count-array": _set(_A + "attention.head_count", [4, 4], "ARRAY", "INT32"),
    "head-count-kv-bool": _set(_A + "attention.head_count_kv", True, "BOOL"),
    "context-length-string": _set(_A + "context_length", "4096", "STRING"),
    "rope-base-string": _set(_A + "rope.freq_base", "high", "STRING"),
    "rms-eps-array": _set(_A + "attention.layer_norm_rms_epsilon", [1e-6], "ARRAY", "FLOAT32"),
    "rope-factor-string": _set(_A + "rope.scaling.factor", "two", "STRING"),
    "tokens-string": _set("tokenizer.ggml.tokens", "w", "STRING"),
    "tokens-ints": _set("tokenizer.ggml.tokens", list(range(512)), "ARRAY", "INT32"),
    "bos-string": _set("tokenizer.ggml.bos_token_id", "1", "STRING"),
    "eos-float": _set("tokenizer.ggml.eos_token_id", 2.5, "FLOAT32"),
    "pre-array": _set("tokenizer.ggml.pre", ["default"], "ARRAY", "STRING"),
    "template-int": _set("tokenizer.chat_template", 5, "INT32"),
    "add-bos-string": _set("tokenizer.ggml.add_bos_token", "yes", "STRING"),
    "merges-ints": _set("tokenizer.ggml.merges", [1, 2], "ARRAY", "INT32"),
    "token-types-strings": _set("tokenizer.ggml.token_type", ["normal"] * 512, "ARRAY", "STRING"),
    # keys of absurd or inconsistent value
    "architecture-gpt2": _set("general.architecture", "gpt2", "STRING"),
    "block-count-0": _set(_A + "block_count", 0, "UINT32"),
    "block-count-3": _set(_A + "block_count", 3, "UINT32"),
    "block-count-1": _set(_A + "block_count", 1, "UINT32"),
    "block-count-2**40": _set(_A + "block_count", 2**40, "UINT64"),
    "head-count-0": _set(_A + "attention.head_count", 0, "UINT32"),
    "head-count-3": _set(_A + "attention.head_count", 3, "UINT32"),
    "head-count-kv-3": _set(_A + "attention.head_count_kv", 3, "UINT32"),
    "key-length-odd": _set(_A + "attention.key_length", 15, "UINT32"),
    "embedding-length-2**40": _set(_A + "embedding_length", 2**40, "UINT64"),
    "ffn-length-negative": _set(_A + "feed_forward_length", -160, "INT32"),
    "context-length-2**40": _set(_A + "context_length", 2**40, "UINT64"),
    "vocab-size-1000": _set(_A + "vocab_size", 1000, "UINT32"),
    "bos-out-of-range": _set("tokenizer.ggml.bos_token_id", 10**6, "UINT32"),
    "eos-is-vocab-size": _set("tokenizer.ggml.eos_token_id", 512, "UINT32"),
    "tokenizer-model-bert": _set("tokenizer.ggml.model", "bert", "STRING"),
    "tokenizer-pre-unknown": _set("tokenizer.ggml.pre", "nonexistent", "STRING"),
    "tokenizer-llama-unk-out-of-range": lambda kv, t: (_set("tokenizer.ggml.model", "llama", "STRING")(kv, t),
                                                       _set("tokenizer.ggml.unknown_token_id", 9999, "UINT32")(kv, t)),
    "token-types-short": _resize_array("tokenizer.ggml.token_type", 10),
    "scores-short": _set("tokenizer.ggml.scores", [0.0] * 10, "ARRAY", "FLOAT32"),
    "tokens-past-vocab": _tokens(600),
    "merges-without-space": _set("tokenizer.ggml.merges", ["w3w4"], "ARRAY", "STRING"),
    "merges-unknown-tokens": _set("tokenizer.ggml.merges", ["zz qq"], "ARRAY", "STRING"),
    "template-malformed": _set("tokenizer.chat_template", "{% for %}", "STRING"),
    "alignment-0": _set("general.alignment", 0, "UINT32"),
    "alignment-3": _set("general.alignment", 3, "UINT32"),
    # tensors missing, extra, misshapen or of an unsupported type
    "no-ffn-down-1": _drop_tensor("blk.1.ffn_down.weight"),
    "no-token-embd": _drop_tensor("token_embd.weight"),
    "attn-q-too-narrow": _set_tensor("blk.0.attn_q.weight", np.zeros((48, 64), np.float32)),
    "attn-norm-3d": _set_tensor("blk.0.attn_norm.weight", np.ones((4, 4, 4), np.float32)),
    "token-embd-500-rows": _set_tensor("token_embd.weight", np.zeros((500, 64), np.float32)),
    "ffn-up-q5_0": _set_tensor("blk.0.ffn_up.weight", np.zeros((160, 64), np.float32), "Q5_0"),
    "output-norm-int32": _set_tensor("output_norm.weight", np.ones(64, np.int32)),
    "extra-block-2": _set_tensor("blk.2.attn_q.weight", np.zeros((64, 64), np.float32)),
    "attn-q-renamed": _rename_tensor("blk.0.attn_q.weight", "blk.0.attn_qq.weight"),
    "rope-freqs-wrong-length": _set_tensor("rope_freqs.weight", np.ones(5, np.float32)),
}
TARGETED = [*TARGETED_WRITES, "version-1", "magic-ggml"]
# cases that must fail, with what the message must say: the absurd lengths refused before any read,
# and the damage an unchecked loader accepted silently (a missing q weight, arrays of the wrong length)
MUST_FAIL = {
    "u8-token-types-2**40": "claims 1099511627776 items",
    "tensor-offset-2**40": "truncated: tensor 'output.weight' ends at byte",
    "version-1": "GGUF version 1 is not supported",
    "block-count-string": "llama.block_count must be an integer, got str 'two'",
    "block-count-2**40": "llama.block_count is 1099511627776, but the file holds tensors of 2 blocks",
    "embedding-length-float": "llama.embedding_length must be an integer",
    "context-length-string": "llama.context_length must be an integer",
    "add-bos-string": "tokenizer.ggml.add_bos_token must be a boolean",
    "token-types-strings": "tokenizer.ggml.token_type must be an array of numbers",
    "token-types-short": "tokenizer.ggml.token_type has 10 entries for 512 tokens",
    "scores-short": "tokenizer.ggml.scores has 10 entries for 512 tokens",
    "tokens-past-vocab": "600 tokens, more than llama.vocab_size (512)",
    "attn-q-renamed": "tensor 'blk.0.attn_q.weight' is missing",
    "attn-q-too-narrow": "tensor 'blk.0.attn_q.weight' has shape [64, 48], but the metadata implies [64, 64]",
    "merges-unknown-tokens": "the tokenizer does not build",
}


def _cases() -> list[str]:
    return ([f"flip-{i}" for i in range(NUM_FLIPS)] + [f"truncate-{i}" for i in range(NUM_TRUNCATIONS)]
            + [f"field-{i}" for i in range(NUM_FIELD_WRITES)] + TARGETED + list(SEMANTIC))


assert len(_cases()) == 150


def _make(case: str, base: BaseFile, directory: Path) -> Path:
    """Write the mutated file of `case`; byte mutations draw from a generator seeded by case."""
    path = directory / f"{case}.gguf"
    if case in TARGETED:
        path.write_bytes(_targeted(case, base))
    elif case in SEMANTIC:
        kv = {k: KV(v.value, v.type, v.sub_type) for k, v in base.kv.items()}
        tensors = dict(base.tensors)
        SEMANTIC[case](kv, tensors)
        _write(path, kv, tensors)
    else:
        mutate = {"flip": _flip, "truncate": _truncate, "field": _overwrite_field}[case.partition("-")[0]]
        path.write_bytes(mutate(base, random.Random(f"{SEED}-{case}")))
    return path


# ---- loading: what the engine does with a model path, up to allocating the KV cache ----

class Hung(BaseException):
    """A load ran past the deadline (a BaseException, so no `except Exception` in the loader hides it)."""


@contextlib.contextmanager
def deadline(seconds: float):
    def expire(signum, frame):
        raise Hung(f"still loading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _load(path: Path) -> None:
    """LLMEngine's loading steps: open, config, tokenizer, then the runner builds the model and reads weights."""
    source = open_model(str(path))
    source.model_config()
    source.tokenizer()
    ModelRunner.load(source, EngineConfig(model=str(path), device=DeviceConfig(device="cpu", dtype="float32")))


def test_the_unmutated_file_loads(base, tmp_path):
    path = tmp_path / "base.gguf"
    path.write_bytes(base.data)
    assert check_layout(str(path)).data_offset == base.data_offset  # the layout check agrees with gguf's reader
    _load(path)


@pytest.mark.parametrize("case", _cases())
def test_mutated_gguf_loads_or_fails_in_one_line(case, base, tmp_path):
    path = _make(case, base, tmp_path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    message = None
    try:
        with deadline(DEADLINE_S):
            _load(path)
    except ModelLoadError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith(f"{path}: ")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before < MAX_RSS_GROWTH
    if case in MUST_FAIL:
        assert message is not None and MUST_FAIL[case] in message


@pytest.mark.parametrize("case", ["truncate-3", "tokens-length-2**40", "block-count-string"])
def test_cli_reports_a_mutated_gguf_in_one_line(case, base, tmp_path, capsys):
    path = _make(case, base, tmp_path)
    assert main(["generate", "--model", str(path), "--prompt", "hi"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("roofline: error:")
