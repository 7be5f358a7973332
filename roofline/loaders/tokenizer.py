"""Tokenizer wrapper: encode/decode, incremental detokenization and chat templates.

Built on the `tokenizers` library. A Hugging Face directory brings its own tokenizer.json;
a GGUF file brings vocabulary and merges as metadata, from which `tokenizer_from_gguf_vocab`
rebuilds the tokenizer the model was trained with.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from roofline.errors import InvalidRequestError, ModelLoadError, first_line

# Split patterns for GGUF `tokenizer.ggml.pre` values: the regex the vocabulary's merges were learned on.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre-type -> (split regex, split every digit first)
_BPE_PRE_TYPES: dict[str, tuple[str, bool]] = {
    "default": (_GPT2_SPLIT, False),
    "gpt2": (_GPT2_SPLIT, False),
    "smollm": (_GPT2_SPLIT, True),  # SmolLM's own tokenizer.json splits digits one by one
    "llama3": (_LLAMA3_SPLIT, False),
    "llama-v3": (_LLAMA3_SPLIT, False),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "smaug-bpe": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False),
}
_CONTROL_TOKEN_TYPES = (3, 4)  # gguf TokenType CONTROL and USER_DEFINED


def tokenizer_from_gguf_vocab(meta: dict) -> Tokenizer:
    """Build a `tokenizers.Tokenizer` from GGUF tokenizer metadata (keys without the `tokenizer.ggml.` prefix),
    its types, lengths and token ids already checked (`gguf_checks.check_vocab`)."""
    try:
        return _tokenizer_from_gguf_vocab(meta)
    except ModelLoadError:
        raise
    except Exception as exc:  # the tokenizers library refusing the vocabulary: merges of unknown tokens, ...
        raise ModelLoadError(f"the tokenizer does not build from the GGUF vocabulary: "
                             f"{first_line(exc)}") from None


def _tokenizer_from_gguf_vocab(meta: dict) -> Tokenizer:
    kind = meta.get("model")
    tokens: list[str] = meta["tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if kind == "gpt2":
        pre = meta.get("pre", "default")
        if pre not in _BPE_PRE_TYPES:
            raise ModelLoadError(f"GGUF tokenizer pre-type {pre!r} is not supported; "
                                 f"supported: {', '.join(sorted(_BPE_PRE_TYPES))}")
        split, split_digits = _BPE_PRE_TYPES[pre]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or []]  # a byte-level vocab may have none
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = meta.get("scores") or [0.0] * len(tokens)
        merges = meta.get("merges") or _merges_from_scores(tokens, scores)
        if merges and isinstance(merges[0], str):
            merges = [tuple(m.split(" ", 1)) for m in merges]
        unk = meta.get("unknown_token_id")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                   unk_token=tokens[unk] if unk is not None else None))
        add_prefix = meta.get("add_space_prefix", True)
        tok.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("▁")] if add_prefix else []) + [normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    else:
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2, llama")
    token_types = meta.get("token_type") or []
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(token_types) if t in _CONTROL_TOKEN_TYPES]
    tok.add_special_tokens(specials)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a sentencepiece vocabulary: a merge ranks by the merged piece's score."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    found: list[tuple[float, int, str, str]] = []
    for piece, idx in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[idx], idx, left, right))
    found.sort()
    return [(left, right) for _, _, left, right in found]


@dataclass
class TokenizerInfo:
    """Special-token facts that do not live inside `tokenizers.Tokenizer`."""

    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos_token: bool = False  # prepend BOS when the tokenizer's own post-processor does not
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None


class TextTokenizer:
    """What the engine needs from a tokenizer: ids in, text out, incrementally, and chat prompts."""

    def __init__(self, tokenizer: Tokenizer, info: TokenizerInfo) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._template = None
        if info.chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            try:
                self._template = env.from_string(info.chat_template)
            except jinja2.TemplateError as exc:
                raise ModelLoadError(f"the model's chat template does not parse: "
                                     f"{(str(exc).splitlines() or ['?'])[0]}") from None

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end generation."""
        return self.info.eos_token_ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """At least as many UTF-8 bytes as any one token covers of its input (its vocabulary entry's length).

        So `len(text.encode()) // max_token_bytes` tokens is a floor on what `text` encodes to, known
        without encoding it: a text far past the context is refused before it is tokenized.
        """
        return max((len(t.encode()) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=1) or 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; with `add_special_tokens`, BOS as the model expects."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.info.bos_token_id
        if add_special_tokens and self.info.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (for logprob entries)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @property
    def template_takes_tools(self) -> bool:
        """True when the chat template renders a `tools` list itself (Llama 3.1+, Qwen 2.5+, Hermes templates)."""
        return bool(self.info.chat_template) and "tools" in self.info.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render a conversation with the model's chat template (`tools`: OpenAI tool objects, for templates
        that take them)."""
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead")
        for msg in messages:
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise InvalidRequestError("each chat message needs a 'role' and a 'content'")
        try:
            extra = {"tools": tools} if tools else {}
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.info.bos_token or "", eos_token=self.info.eos_token or "",
                                         **extra)
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template failed: {exc}") from None


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] give context for the next decode
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        """Append tokens and return the newly completed text."""
        self.ids.extend(token_ids)
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self._prefix_offset:], self.skip_special_tokens)
        if full.endswith("\ufffd") or len(full) < len(prefix):
            return ""  # an unfinished UTF-8 sequence: wait for more bytes
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self.text += delta
        return delta
