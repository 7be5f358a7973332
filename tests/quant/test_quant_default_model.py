"""The default model (SmolLM2-135M Q4_1 GGUF) served quantized: exact GGUF mapping and greedy agreement with fp32.

Agreement: over 8 prompts and fp32's first 16 greedy tokens, the share of steps where the quantized
model, given fp32's prefix, picks the same next token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from roofline import LLM, SamplingParams
from roofline.loaders import open_model
from roofline.loaders.gguf import GGMLTensor
from roofline.quant.embedding import Int8Embedding
from roofline.quant.functional import Int4Weight, decode_ggml, dequantize_int4
from roofline.quant.linear import Int4Linear, Int8Linear

NUM_TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite way to spend a Sunday afternoon is",
    "The theory of relativity was developed by",
    "To make a cup of tea, first",
]
MIN_AGREEMENT = {"auto": 0.9, "int4": 0.9, "int8": 0.9}  # measured figures: docs/quantization.md


@pytest.fixture(scope="module")
def source():
    return open_model("default")


@pytest.fixture(scope="module")
def llms(source) -> dict[str, LLM]:
    """method -> LLM on the default model, all sharing one parsed GGUF file (parsing it is the slow part)."""
    mp = pytest.MonkeyPatch()
    mp.setattr("roofline.engine.llm_engine.open_model", lambda model: source)
    try:
        return {m: LLM("default", quantization=m, dtype="float32", device="cpu", kv_cache_memory=32 << 20,
                       max_model_len=256) for m in ("none", "auto", "int8", "int4")}
    finally:
        mp.undo()


def test_auto_serves_the_files_own_4_bit_blocks(llms):
    model = llms["auto"].engine.runner.model
    layer = model.model.layers[0]
    for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(m, Int4Linear) and m.group_size == 32
    assert isinstance(model.model.embed_tokens, Int8Embedding)  # Q8_0 in the file
    assert model.lm_head.is_tied and model.lm_head.weights is model.model.embed_tokens
    fp32 = llms["none"].engine.runner.weight_bytes
    assert llms["auto"].engine.runner.weight_bytes < fp32 / 5  # 513 MiB -> about 91 MiB
    assert llms["int8"].engine.runner.weight_bytes < fp32 / 3.5


def test_q4_1_tensors_map_onto_int4_exactly(source, llms):
    # the layer's 4-bit values, scales and zeros reproduce gguf's own dequantization (up to the bf16
    # rounding of the per-group scale and zero the kernel takes); q/k rows arrive un-permuted
    names = {"model.layers.3.self_attn.k_proj.weight", "model.layers.3.mlp.down_proj.weight"}
    raw = {n: t for n, t in source.tensors(torch.float32, keep_quantized=set(source.tensor_types()))
           if n in names}
    dequantized = {n: t for n, t in source.tensors(torch.float32) if n in names}
    for name in names:
        assert isinstance(raw[name], GGMLTensor) and raw[name].type_name == "Q4_1"
        ref = dequantized[name]
        decoded = decode_ggml("Q4_1", raw[name].blocks, ref.shape[1])
        assert isinstance(decoded, Int4Weight) and torch.equal(dequantize_int4(decoded), ref)  # exact
        layer = Int4Linear(ref.shape[1], [ref.shape[0]], 32)
        layer.load("weight", raw[name])
        assert (layer.dequantize() - ref).abs().max() <= 2 ** -7 * ref.abs().max()
    model = llms["auto"].engine.runner.model
    k_rows = slice(576, 576 + 192)  # k is the second shard of the packed qkv
    packed = model.model.layers[3].self_attn.qkv_proj.dequantize()[k_rows]
    assert (packed - dequantized["model.layers.3.self_attn.k_proj.weight"]).abs().max() <= 2 ** -7 * packed.abs().max()


def test_q8_0_embedding_requantized_per_row(source, llms):
    name = "model.embed_tokens.weight"
    ref = next(t for n, t in source.tensors(torch.float32, keep_quantized={"x"}) if n == name)
    emb = llms["auto"].engine.runner.model.model.embed_tokens
    ours = emb.qweight.float() * emb.scale[:, None]
    assert ((ours - ref).abs() <= emb.scale[:, None] / 2 + 1e-6).all()  # within half a per-row int8 step
    assert (F.cosine_similarity(ours, ref, dim=1) > 0.999).all()


def _greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def fp32_greedy(llms) -> list[list[int]]:
    return _greedy(llms["none"])


@pytest.mark.parametrize("method", ["auto", "int4", "int8"])
def test_greedy_choices_agree_with_fp32(llms, fp32_greedy, method):
    # teacher-forced: at each of fp32's 16 greedy steps, given fp32's prefix, does the quantized model
    # pick the same next token? (free-running agreement compounds the first near-tie; it is printed)
    llm = llms[method]
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([p + g for p, g in zip(prompts, fp32_greedy)], params)
    same = 0
    for prompt, greedy, out in zip(prompts, fp32_greedy, outs):
        for pos, token in enumerate(greedy, start=len(prompt)):
            top = min(out.prompt_logprobs[pos].items(), key=lambda kv: kv[1].rank)[0]
            same += top == token
    forced = same / (len(PROMPTS) * NUM_TOKENS)
    free = sum(a == b for ref, got in zip(fp32_greedy, _greedy(llm)) for a, b in zip(ref, got))
    print(f"{method}: teacher-forced {forced:.1%}, free-running {free / (len(PROMPTS) * NUM_TOKENS):.1%} "
          f"of greedy tokens equal to fp32")
    assert forced >= MIN_AGREEMENT[method]


def test_low_bit_layers_are_used_for_every_linear(llms):
    for method, kinds in (("int8", (Int8Linear,)), ("int4", (Int4Linear,))):
        model = llms[method].engine.runner.model
        for layer in model.model.layers:
            for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                assert isinstance(m, kinds)
