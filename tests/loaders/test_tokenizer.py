"""The tokenizer rebuilt from the default GGUF's metadata: ids, text, chat template, incremental decoding."""

from __future__ import annotations

import os

import pytest

from roofline.loaders import default_model_path, open_model
from roofline.loaders.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they've said we'll go, but can't.",
    "  leading spaces",
    "trailing spaces   ",
    "multiple     spaces    between\t\ttabs",
    "lines\nand\n\n\nblank lines\r\nwith CRLF\n",
    "def square(x):\n    return x ** x  # not quite\n\n\nclass A:\n\tpass\n",
    "if (a && b) { return *p->next; } // C++ <vector>",
    "naïve café résumé Ünïcödé",
    "Привет, мир! Γειά σου κόσμε.",
    "日本語のテキストと中文字符",
    "emoji 😀🎉 thumbs 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "zero\u200bwidth and\u00a0no-break space",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text<|endoftext|>",
    "<s>angle brackets that are not special</s>",
    "http://example.com/path?q=x&r=y#frag",
    "",
    " ",
    "\n",
]
DIGIT_TEXTS = ["2024", "Price: $19.99, or 3.14159 per 1,000,000 units.", "in 1999 and 2000",
               "x1 y22 z333", "phone +1 (555) 010-9999", "①②③ and ² ³ and Ⅻ", "١٢٣ arabic-indic"]


@pytest.fixture(scope="module")
def tok():
    """roofline's tokenizer for the default model."""
    return open_model("default").tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
    """transformers' tokenizer converted from the same GGUF."""
    from transformers import AutoTokenizer

    directory, name = os.path.split(default_model_path())
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def smollm_reference(hf_tok):
    """transformers' vocabulary and merges with the pre-tokenizer SmolLM2 was trained with (llama.cpp's
    "smollm" pre-type: every numeric character on its own, then the GPT-2 split)."""
    import copy

    from tokenizers import Regex, pre_tokenizers

    backend = copy.deepcopy(hf_tok.backend_tokenizer)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_like_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS + DIGIT_TEXTS)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_special_tokens_are_single_ids_and_skipped_on_decode(tok):
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # <|im_start|>, <|im_end|> in SmolLM2's vocabulary
    assert tok.decode(ids) == "user\nHi"
    assert tok.eos_token_ids == [2]


@pytest.mark.parametrize("text", DIGIT_TEXTS)
def test_numbers_split_into_single_digits_as_smollm_does(tok, smollm_reference, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == smollm_reference.encode(text, add_special_tokens=False).ids
    for token_id in ids:
        piece = tok.token_text(token_id)
        assert sum(c.isnumeric() for c in piece) <= 1, piece


def test_year_is_four_tokens(tok):
    ids = tok.encode("2024", add_special_tokens=False)
    assert [tok.token_text(i) for i in ids] == ["2", "0", "2", "4"]


def test_chat_template_renders_the_smollm_format(tok, hf_tok):
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(with_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    # without a system message SmolLM2's template adds its own
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    for conversation in (with_system, [{"role": "user", "content": "Hi"}]):
        assert tok.apply_chat_template(conversation) == hf_tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True)


MULTIBYTE_TEXTS = ["naïve café", "日本語のテキスト", "emoji 😀🎉👍🏽 and 👨‍👩‍👧 done", "Привет мир", "a\u200bb",
                   "mixed ascii, 中文, and 🇫🇷 flags"]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_incremental_detokenizer_reproduces_full_decode(tok, text, step):
    prompt = tok.encode("Say:", add_special_tokens=False)
    ids = tok.encode(" " + text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    assert "".join(deltas) == tok.decode(ids) == " " + text
    assert detok.text == " " + text
    assert not any("\ufffd" in d for d in deltas)  # never half a character


def test_incremental_detokenizer_holds_back_a_partial_character(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # a byte-level vocabulary spells this emoji with several byte tokens
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "😀"
