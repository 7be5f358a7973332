"""Structured outputs in the engine: a tiny random-weight model with the default model's real tokenizer.

Random weights are the hard case: nothing but the grammar mask makes the text valid, so every output
must parse and validate against its schema (jsonschema) whatever the model prefers.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace

import jsonschema
import pytest
import torch

from roofline.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from roofline.engine.llm_engine import LLMEngine
from roofline.engine.structured import GrammarEngine, StructuredRows, apply_token_mask
from roofline.errors import InvalidRequestError
from roofline.loaders import open_model
from roofline.sampling_params import SamplingParams, StructuredSpec

pytest.importorskip("xgrammar")

# bounded strings, numbers and arrays: a random model never chooses to close a string, so an unbounded one
# would run to max_tokens; the bounds let the grammar finish every output on its own
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"status": {"enum": ["active", "inactive", "banned"]}, "ok": {"type": "boolean"}},
     "required": ["status", "ok"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}},
        "required": ["id", "tags"]}}, "required": ["user"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["score"]},
    {"type": "object", "properties": {"x": {"type": "null"}, "y": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]}}, "required": ["x", "y"]},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"q": {"type": "object", "properties": {
        "r": {"const": "deep"}}, "required": ["r"]}}, "required": ["q"]}}, "required": ["p"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string", "maxLength": 4}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}, "minItems": 1, "maxItems": 2}}, "required": ["items"]},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3},
                                      "b": {"type": "integer", "minimum": 0, "maximum": 3}}, "required": ["a"]},
]
PROMPT = "Reply in JSON."


class TinyRandomSource:
    """A 2-layer random-weight Llama with the default model's vocabulary and tokenizer (no files written)."""

    def __init__(self, seed: int = 0) -> None:
        self.base = open_model("default")
        self.seed = seed
        self.config = replace(self.base.model_config(), hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)

    def model_config(self):
        return self.config

    def tokenizer(self):
        return self.base.tokenizer()

    def _shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        c = self.config
        h, q, kv, i = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        shapes = [("model.embed_tokens.weight", (c.vocab_size, h)), ("model.norm.weight", (h,))]
        for layer in range(c.num_layers):
            p = f"model.layers.{layer}."
            shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                       (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                       (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                       (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                       (p + "mlp.down_proj.weight", (h, i))]
        return shapes

    def num_tensors(self) -> int:
        return len(self._shapes())

    def tensors(self, dtype, raw_names=None):
        g = torch.Generator().manual_seed(self.seed)
        for name, shape in self._shapes():
            # large weights: peaked, confident logits, so the model's own choices fight the grammar
            yield name, torch.ones(shape, dtype=dtype) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.5


def make_engine(**scheduler) -> LLMEngine:
    """The tiny model in an engine on the CPU; `scheduler` overrides SchedulerConfig fields."""
    config = EngineConfig(model="tiny-random", device=DeviceConfig(device="cpu", dtype="float32"),
                          cache=CacheConfig(memory_bytes=scheduler.pop("kv_bytes", 16 << 20)),
                          scheduler=SchedulerConfig(**{"max_num_seqs": 32, "max_num_batched_tokens": 256,
                                                       **scheduler}))
    return LLMEngine(config, source=TinyRandomSource())


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return make_engine()


def run(engine: LLMEngine, requests: dict[str, tuple[str | list[int], SamplingParams]]) -> dict:
    """Add every request, step until all finish: request id -> final RequestOutput."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def assert_valid(out, schema: dict) -> None:
    for c in out.outputs:
        assert c.finish_reason == "stop", (c.finish_reason, c.text)
        jsonschema.validate(json.loads(c.text), schema)


def test_every_schema_of_the_corpus_validates_greedy_and_sampled_in_one_batch(engine):
    requests = {}
    for i, schema in enumerate(SCHEMAS):
        spec = StructuredSpec.json(schema)
        requests[f"greedy-{i}"] = (PROMPT, SamplingParams(max_tokens=200, temperature=0, structured=spec))
        requests[f"sampled-{i}"] = (PROMPT, SamplingParams(max_tokens=200, temperature=1.0, top_p=0.9, top_k=50,
                                                           seed=i, structured=spec))
    requests["plain"] = (PROMPT, SamplingParams(max_tokens=30, temperature=0))  # an unmasked row beside them
    done = run(engine, requests)
    for i, schema in enumerate(SCHEMAS):
        assert_valid(done[f"greedy-{i}"], schema)
        assert_valid(done[f"sampled-{i}"], schema)
    plain = done["plain"].outputs[0]
    assert plain.finish_reason == "length"  # the unmasked row ran free: random weights never stop on their own
    with pytest.raises(ValueError):
        json.loads(plain.text)


def test_n_samples_each_follow_their_own_matcher(engine):
    schema = SCHEMAS[3]
    done = run(engine, {"n": (PROMPT, SamplingParams(n=4, max_tokens=200, temperature=1.0, seed=7,
                                                      structured=StructuredSpec.json(schema)))})
    assert_valid(done["n"], schema)
    assert len({c.text for c in done["n"].outputs}) > 1  # distinct samples, each valid on its own


def test_regex_and_grammar_constraints(engine):
    grammar = 'root ::= "(" item (", " item)* ")"\nitem ::= [a-c] | "yes" | "no"'
    done = run(engine, {
        "re": (PROMPT, SamplingParams(max_tokens=60, temperature=1.0, seed=3,
                                      structured=StructuredSpec.regex(r"[A-Z]{2}-\d{3}"))),
        "g": (PROMPT, SamplingParams(max_tokens=60, temperature=1.0, seed=4,
                                     structured=StructuredSpec.grammar(grammar))),
    })
    assert re.fullmatch(r"[A-Z]{2}-\d{3}", done["re"].outputs[0].text), done["re"].outputs[0].text
    assert done["re"].outputs[0].finish_reason == "stop"
    text = done["g"].outputs[0].text
    if done["g"].outputs[0].finish_reason == "stop":
        assert re.fullmatch(r"\((?:[a-c]|yes|no)(?:, (?:[a-c]|yes|no))*\)", text), text
    else:  # cut by max_tokens: still a prefix the grammar allows
        assert re.fullmatch(r"\((?:[a-c]|yes|no)(?:, (?:[a-c]|yes|no))*(?:, ?)?(?:y|ye|n)?", text), text


def test_logprobs_stay_the_raw_models(engine, reference):
    schema = SCHEMAS[1]
    prompt_ids = engine.tokenizer.encode(PROMPT)
    done = run(engine, {"lp": (prompt_ids, SamplingParams(max_tokens=200, temperature=0, logprobs=3,
                                                           structured=StructuredSpec.json(schema)))})
    out = done["lp"].outputs[0]
    full = reference.roofline_full_logits(engine.runner.model, prompt_ids + out.token_ids[:-1])
    raw = full[len(prompt_ids) - 1:].log_softmax(-1)  # [num_generated, vocab]
    ranks = []
    for step, (tid, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry[tid].logprob == pytest.approx(raw[step, tid].item(), abs=1e-4)
        ranks.append(entry[tid].rank)
        top = raw[step].topk(3)
        assert [t for t, e in entry.items() if e.rank <= 3] == top.indices.tolist()  # masked tokens listed too
    assert max(ranks) > 1  # the grammar overruled the model: its top token was not allowed


def test_preemption_and_chunked_prefill_keep_matchers_in_step():
    # a KV cache too small for every request at once (recompute preemption), prompts longer than a step's budget
    engine = make_engine(kv_bytes=40 * 16 * 512, max_num_batched_tokens=32, max_model_len=320,
                         preemption_mode="recompute")
    prompt = engine.tokenizer.encode(" ".join(f"word{i}" for i in range(40)))
    requests = {f"r{i}": (prompt[i:], SamplingParams(max_tokens=120, temperature=1.0, seed=i,
                                                       structured=StructuredSpec.json(SCHEMAS[8])))
                for i in range(8)}
    done = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    for out in done.values():
        assert_valid(out, SCHEMAS[8])


def test_a_batch_without_structured_rows_never_builds_a_mask(engine, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a mask was built for a batch without structured rows")

    monkeypatch.setattr(StructuredRows, "token_mask", fail)
    done = run(engine, {"a": (PROMPT, SamplingParams(max_tokens=5)), "b": (PROMPT, SamplingParams(n=2, max_tokens=5))})
    assert len(done) == 2 and not engine.runner.structured.matchers


def test_bad_constraints_are_one_line_errors(engine):
    for spec in (StructuredSpec.json({"type": "foo"}), StructuredSpec.regex("[a-"),
                 StructuredSpec.grammar('item ::= "a"')):
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request("bad", PROMPT, SamplingParams(structured=spec))
        assert "\n" not in str(err.value) and "does not compile" in str(err.value)
    assert not engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        StructuredSpec.json("{not json")


def test_missing_grammar_engine_says_what_to_install(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    fresh = GrammarEngine(engine.tokenizer, engine.model_config.vocab_size)
    with pytest.raises(InvalidRequestError, match=r"roofline\[grammar\]"):
        fresh.compile(StructuredSpec.json_object())


def test_llm_generate_takes_a_structured_spec():
    from roofline import LLM

    llm = LLM(model="default", kv_cache_memory=32 << 20, kernels="default")  # no kernel probe: fast to load
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    (out,) = llm.chat([{"role": "user", "content": "Is water wet? Answer in JSON."}],
                      SamplingParams(max_tokens=20, temperature=0, structured=StructuredSpec.json(schema)))
    assert out.outputs[0].finish_reason == "stop"
    assert json.loads(out.outputs[0].text)["answer"] in ("yes", "no")


def test_special_tokens_are_never_text_inside_a_grammar(engine):
    grammar = GrammarEngine(engine.tokenizer, engine.model_config.vocab_size)
    rows = StructuredRows(grammar)
    rows.add("s", StructuredSpec.json({"type": "string"}), engine.tokenizer.encode('"ab', add_special_tokens=False))
    mask = rows.token_mask(["s"])
    logits = apply_token_mask(torch.zeros(1, engine.model_config.vocab_size), mask)
    special = [i for i, t in engine.tokenizer.tokenizer.get_added_tokens_decoder().items() if t.special]
    assert len(special) > 3 and torch.isinf(logits[0, special]).all()  # "<|im_start|>" is not string content
    assert torch.isfinite(logits[0]).sum() > 1000  # ordinary text is
    assert not rows.accept("s", engine.tokenizer.encode('"', add_special_tokens=False)[0])  # closed, not ended
    allowed = torch.isfinite(apply_token_mask(torch.zeros(1, engine.model_config.vocab_size),
                                              rows.token_mask(["s"]))[0]).nonzero().flatten().tolist()
    assert allowed == engine.tokenizer.eos_token_ids  # complete: only EOS may follow
    assert rows.accept("s", allowed[0])
