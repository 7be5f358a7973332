"""Structured outputs: grammars compiled per spec, one matcher per sample, token masks on logits rows.

The grammar engine is xgrammar (the optional extra `roofline[grammar]`; docs/structured-outputs.md
says why). `GrammarEngine` compiles a StructuredSpec against the tokenizer's vocabulary once (cached
by spec) and makes matchers; `StructuredRows` is the runner's side: a matcher per structured
sample, kept in step with that sample's tokens (rebuilt from them when a preempted request comes
back), whose bitmask is applied to the sample's logits row before sampling. A step without
structured samples never enters this module.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from roofline.errors import InvalidRequestError, first_line
from roofline.loaders.tokenizer import TextTokenizer
from roofline.sampling_params import StructuredSpec

GRAMMAR_MISSING = ("structured outputs (response_format, guided_regex, guided_grammar) need the grammar engine: "
                   "pip install 'roofline[grammar]'")
_WHAT = {"json_schema": "the JSON schema", "json_object": "the JSON object grammar", "regex": "the regex",
         "grammar": "the grammar"}
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+\.cc:\d+: ")  # xgrammar's "[hh:mm:ss] file.cc:line: " prefix


def grammar_available() -> bool:
    """True when the grammar engine (xgrammar) is installed."""
    return importlib.util.find_spec("xgrammar") is not None


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise InvalidRequestError(GRAMMAR_MISSING) from None
    return xgrammar


def _vocab_type(xgr, tokenizer: TextTokenizer):
    """How the vocabulary spells bytes: byte-level BPE (GPT-2's 'Ġ'), SentencePiece byte fallback, or raw."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    decoders = [spec.get("decoder") or {}]
    decoders += decoders[0].get("decoders") or []
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in types:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


class GrammarEngine:
    """Compiles StructuredSpecs for one tokenizer and model vocabulary; xgrammar is imported on first use."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (logits) width, which may exceed the tokenizer's
        self._compiler = None
        self._cache: dict[StructuredSpec, Any] = {}
        self._lock = threading.Lock()  # compiles run on server threads and the engine thread

    @property
    def stop_token_ids(self) -> list[int]:
        """The tokens a finished grammar allows: the model's EOS ids."""
        return list(self.tokenizer.eos_token_ids)

    def _get_compiler(self):
        if self._compiler is None:
            xgr = _xgrammar()
            raw = self.tokenizer.tokenizer
            vocab = [raw.id_to_token(i) or "" for i in range(min(raw.get_vocab_size(), self.vocab_size))]
            # special tokens spell markup ("<|im_start|>"), not text: an empty entry keeps xgrammar from
            # allowing them as literal characters inside a JSON string (EOS still ends the grammar as a stop id)
            for i, added in raw.get_added_tokens_decoder().items():
                if added.special and i < len(vocab):
                    vocab[i] = ""
            add_prefix = (raw.encode("a", add_special_tokens=False).tokens or [""])[0][:1] == "▁"
            info = xgr.TokenizerInfo(vocab, vocab_type=_vocab_type(xgr, self.tokenizer), vocab_size=self.vocab_size,
                                     stop_token_ids=self.stop_token_ids, add_prefix_space=add_prefix)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def compile(self, spec: StructuredSpec):
        """The compiled grammar of `spec` (cached); an InvalidRequestError when it does not compile."""
        compiled = self._cache.get(spec)
        if compiled is not None:
            return compiled
        with self._lock:
            compiler = self._get_compiler()
            try:
                # compact JSON (", " and ": " separators, no free whitespace): a weak model can otherwise emit
                # whitespace until max_tokens. strict_mode: no properties beyond the schema's (still valid JSON
                # Schema output, and what OpenAI's strict mode means).
                if spec.kind == "json_schema":
                    compiled = compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
                elif spec.kind == "json_object":
                    compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                            strict_mode=False)
                elif spec.kind == "regex":
                    compiled = compiler.compile_regex(spec.value)
                else:
                    compiled = compiler.compile_grammar(spec.value)
            except (RuntimeError, ValueError, TypeError) as exc:
                reason = _CPP_PREFIX.sub("", first_line(exc).strip())
                raise InvalidRequestError(f"{_WHAT[spec.kind]} does not compile: {reason}") from None
            self._cache[spec] = compiled
        return compiled

    def matcher(self, spec: StructuredSpec, token_ids: list[int] = ()):
        """A fresh matcher for `spec`, advanced over `token_ids` (the sample's output so far)."""
        m = _xgrammar().GrammarMatcher(self.compile(spec))
        for t in token_ids:
            if not m.accept_token(t):
                raise RuntimeError(f"token {t} does not follow the request's grammar: the matcher lost step")
        return m


@dataclass
class TokenMask:
    """Allowed tokens of some rows of a logits batch: a packed bitmask (1 = allowed) and the rows it applies to."""

    bitmask: torch.Tensor  # [num_rows, ceil(vocab / 32)] int32, on the CPU
    rows: list[int]  # rows of the logits batch it masks; the others stay as they are


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """A copy of logits [N, V] with the disallowed tokens of the masked rows at -inf."""
    xgr = _xgrammar()
    out = logits.clone()
    bitmask = mask.bitmask.to(out.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(out, bitmask, vocab_size=out.shape[-1], indices=mask.rows)
    return out


class StructuredRows:
    """The runner's grammar matchers, one per structured sample, in step with the sample's tokens."""

    def __init__(self, engine: GrammarEngine) -> None:
        self.engine = engine
        self.matchers: dict[str, Any] = {}  # request id -> its GrammarMatcher
        self._bitmask: torch.Tensor | None = None  # [rows, words] reused between steps

    def __bool__(self) -> bool:
        return bool(self.matchers)

    def add(self, request_id: str, spec: StructuredSpec, output_token_ids: list[int]) -> None:
        """Hold a matcher for a sample, advanced over what it has generated (a resumed request's tokens)."""
        self.matchers[request_id] = self.engine.matcher(spec, output_token_ids)

    def remove(self, request_id: str) -> None:
        """Forget a sample (unknown ids are ignored)."""
        self.matchers.pop(request_id, None)

    def token_mask(self, owners: list[str]) -> TokenMask | None:
        """The mask of the structured rows among `owners` (row i samples for owners[i]); None when there are none."""
        rows = [i for i, rid in enumerate(owners) if rid in self.matchers]
        if not rows:
            return None
        words = -(-self.engine.vocab_size // 32)
        if self._bitmask is None or self._bitmask.shape[0] < len(owners):
            self._bitmask = torch.full((max(len(owners), 8), words), -1, dtype=torch.int32)
        for i in rows:
            self.matchers[owners[i]].fill_next_token_bitmask(self._bitmask, i)
        return TokenMask(self._bitmask[: len(owners)], rows)

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advance a sample's matcher by its sampled token; True when the grammar has now terminated."""
        m = self.matchers.get(request_id)
        if m is None:
            return False
        if not m.accept_token(token_id):
            raise RuntimeError(f"sampled token {token_id} is outside the grammar of {request_id}")
        return m.is_terminated()
