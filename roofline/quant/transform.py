"""Quantization as a transform on an unchanged model: plan per module, swap modules, load, finalize.

    plan = plan_quantization(model, "int4", group_size=32, tensor_types=source_types)
    quantize_model(model, plan)                         # before any weight is loaded
    model.load_weights(route_tensors(model, tensors))   # embedding / head fed here, linears by the model
    finalize_quantized(model)                           # pack for the kernels, check completeness

The plan is made before loading so no module is ever filled in floating point first, and a GGUF
file's quantized tensors can reach their layer as raw blocks (`plan.raw_tensor_names`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from roofline.layers.embedding import LMHead, VocabEmbedding
from roofline.layers.linear import Linear
from roofline.loaders.gguf import GGMLTensor
from roofline.quant.embedding import Int8Embedding, Int8LMHead
from roofline.quant.functional import INT4_GGML_TYPES
from roofline.quant.linear import INT4_PACK_ROW_MULTIPLE, Int4Linear, Int8Linear

logger = logging.getLogger("roofline")

QUANTIZATION_METHODS = ("auto", "none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class LinearScheme:
    """How one module's weight is stored: "int8" (per channel) or "int4" (with `group_size`)."""

    kind: str
    group_size: int | None = None


@dataclass
class QuantPlan:
    """Which modules become which low-bit layers, and which checkpoint tensors may arrive as raw blocks."""

    schemes: dict[str, LinearScheme] = field(default_factory=dict)  # module path -> scheme; absent: floating point
    raw_tensor_names: set[str] = field(default_factory=set)  # GGUF tensors to hand over undecoded

    @property
    def is_empty(self) -> bool:
        """True when nothing is quantized."""
        return not self.schemes

    def describe(self) -> str:
        """One line for the start-up log, e.g. "int4 g32: 210 linears; int8: 1"."""
        counts: dict[str, int] = {}
        for s in self.schemes.values():
            key = s.kind if s.group_size is None else f"{s.kind} g{s.group_size}"
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{k}: {n} modules" for k, n in sorted(counts.items())) or "none"


def quantizes(method: str, tensor_types: dict[str, str] | None) -> bool:
    """Whether `method` turns a checkpoint with these tensor types low-bit (what plan_quantization does with it,
    read from metadata alone: `roofline plan --memory-limit` asks it without building the model)."""
    types = tensor_types or {}
    return method != "none" and not (method == "auto" and all(t in FLOAT_TYPES for t in types.values()))


def plan_quantization(model: nn.Module, method: str, group_size: int = 32,
                      tensor_types: dict[str, str] | None = None) -> QuantPlan:
    """Choose a scheme per Linear / embedding / head.

    "none": nothing. "int8" / "int4": every linear (int4 falls back to a group size that divides the
    input, else to int8); the embedding and head int8. "auto": a GGUF file's own precision where a
    kernel exists (Q4_0/Q4_1/Q4_K -> int4 g32, other quantized types -> int8, F32/F16/BF16 -> as is);
    a floating-point checkpoint (`tensor_types` None or all float) stays as it is.
    """
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {method!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    plan = QuantPlan()
    types = tensor_types or {}
    if not quantizes(method, types):
        return plan
    sources = _checkpoint_sources(model)  # module path -> checkpoint weight names
    for path, module in model.named_modules():
        if isinstance(module, (VocabEmbedding, LMHead)):
            if isinstance(module, LMHead) and module.is_tied:
                continue  # follows the embedding
            shard_types = [types.get(n) for n in sources.get(path, [])]
            if method != "auto" or any(t not in FLOAT_TYPES for t in shard_types if t):
                plan.schemes[path] = LinearScheme("int8")
        elif isinstance(module, Linear):
            shard_types = [types.get(n) for n in sources.get(path, [])]
            if method == "auto":
                scheme = _auto_scheme(shard_types)
            elif method == "int8":
                scheme = LinearScheme("int8")
            else:
                scheme = _int4_scheme(module, group_size)
            if scheme is not None:
                plan.schemes[path] = scheme
    for path in plan.schemes:
        # a low-bit layer decodes Q4_0/Q4_1/Q4_K/Q8_0 blocks itself and dequantizes other types one tensor
        # at a time; either way no floating-point copy of the whole model is made
        plan.raw_tensor_names.update(n for n in sources.get(path, []) if types.get(n, "F32") not in FLOAT_TYPES)
    return plan


def _auto_scheme(shard_types: list[str | None]) -> LinearScheme | None:
    known = [t for t in shard_types if t is not None]
    if not known or any(t in FLOAT_TYPES for t in known):
        return None
    if all(t in INT4_GGML_TYPES for t in known):
        return LinearScheme("int4", 32)
    return LinearScheme("int8")


def _int4_scheme(module: Linear, group_size: int) -> LinearScheme:
    if module.out_features % INT4_PACK_ROW_MULTIPLE == 0:
        for g in sorted((g for g in INT4_GROUP_SIZES if g <= group_size), reverse=True):
            if module.in_features % g == 0:
                return LinearScheme("int4", g)
    return LinearScheme("int8")


def _checkpoint_sources(model: nn.Module) -> dict[str, list[str]]:
    """Our module path -> HF checkpoint weight names that fill it (several for packed modules)."""
    packed = getattr(model, "packed_modules", {})
    inverse: dict[str, list[tuple[int, str]]] = {}
    for ckpt_leaf, (our_leaf, shard) in packed.items():
        inverse.setdefault(our_leaf, []).append((shard, ckpt_leaf))
    sources: dict[str, list[str]] = {}
    for path, _ in model.named_modules():
        parent, _, leaf = path.rpartition(".")
        if leaf in inverse:
            prefix = f"{parent}." if parent else ""
            sources[path] = [f"{prefix}{c}.weight" for _, c in sorted(inverse[leaf])]
        else:
            sources[path] = [f"{path}.weight"]
    return sources


def quantize_model(model: nn.Module, plan: QuantPlan) -> None:
    """Swap the planned modules for empty low-bit ones, in place, before the weights are loaded."""
    modules = dict(model.named_modules())
    embedding = None
    for path, scheme in plan.schemes.items():
        module = modules[path]
        if isinstance(module, VocabEmbedding):
            vocab, dim = module.weight.shape
            embedding = Int8Embedding(vocab, dim, module.weight.dtype, module.weight.device)
            new: nn.Module = embedding
        elif isinstance(module, LMHead):
            vocab, dim = module.weight.shape
            new = Int8LMHead(vocab, dim, device=module.weight.device)
        elif scheme.kind == "int8":
            new = Int8Linear(module.in_features, module.output_sizes, module.bias is not None, module.weight.device)
        else:
            new = Int4Linear(module.in_features, module.output_sizes, scheme.group_size, module.bias is not None,
                             module.weight.device)
        _set_submodule(model, path, new)
    if embedding is not None:
        for path, module in list(model.named_modules()):
            if isinstance(module, LMHead) and module.is_tied:
                _set_submodule(model, path, Int8LMHead(*embedding.qweight.shape, tied_to=embedding))


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)


def route_tensors(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor | GGMLTensor]]
                  ) -> Iterator[tuple[str, torch.Tensor | GGMLTensor]]:
    """Feed the int8 embedding / untied head their tensors; pass every other tensor on to the model."""
    targets = {f"{path}.weight": m for path, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, Int8Embedding) or (isinstance(m, Int8LMHead) and not m.is_tied)}
    for name, tensor in tensors:
        target = targets.get(name)
        if target is not None:
            target.load_tensor(tensor)
        elif isinstance(tensor, GGMLTensor) and not isinstance(_owner(model, name), (Int8Linear, Int4Linear)):
            yield name, tensor.dequantize()  # a planned-away module (e.g. a tied head's copy): plain floats
        else:
            yield name, tensor


def _owner(model: nn.Module, name: str) -> nn.Module | None:
    path = name.rpartition(".")[0]
    parent, _, leaf = path.rpartition(".")
    packed = getattr(model, "packed_modules", {})
    if leaf in packed:
        path = f"{parent}.{packed[leaf][0]}"
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def finalize_quantized(model: nn.Module) -> None:
    """Pack loaded low-bit layers for their kernels; raise if a quantized embedding or head got no weights."""
    for path, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            module.finalize()
        elif isinstance(module, (Int8Embedding, Int8LMHead)) and not module.is_loaded:
            raise ValueError(f"checkpoint lacks the weights of {path}")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights: parameters, plus the buffers (int8 rows, scales) of low-bit modules; each storage once."""
    tensors = list(model.parameters())
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear, Int8Embedding)):
            tensors += [b for b in module.buffers(recurse=False) if b is not None]
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type != "meta":
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())
