"""Structured outputs: what a grammar costs, for the default model's tokenizer (SmolLM2, vocabulary 49152).

    python bench/structured.py [--engines] [--steps 48] [--threads 1]

Part 1 (--engines, each engine that is installed: xgrammar, llguidance, outlines-core): grammar compile
time for a few JSON schemas (and any JSON object where the engine has one), and the per-token mask cost
along a valid token walk: filling the bitmask and applying it to one logits row.
Part 2 (always, xgrammar as roofline uses it): batch-1 greedy decode of the default model, plain against
a JSON-schema request in the same run; the mask's share of a decode step (matcher fill + apply + advance),
measured inside the runner.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time

import numpy as np
import torch

from roofline.llm import LLM
from roofline.loaders import open_model
from roofline.sampling_params import SamplingParams, StructuredSpec

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}, '{"name": "bob", "age": 7}'),
    "nested": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"},
                                                  "tags": {"type": "array", "items": {"type": "string"}}},
                 "required": ["id", "tags"]},
        "status": {"enum": ["active", "inactive", "banned"]}, "score": {"type": "number"}},
        "required": ["user", "status"]}, '{"user": {"id": 1, "tags": ["a", "b"]}, "status": "active"}'),
    "array": ({"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"},
                                                                            "y": {"type": "boolean"}},
                                          "required": ["x", "y"]}}, '[{"x": 1.5, "y": true}, {"x": 2, "y": false}]'),
}
VOCAB = 49152


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


def _walk(fill, apply, accept, ids: list[int]) -> tuple[float, float]:
    """Mean microseconds of fill and of apply over a token walk."""
    logits = torch.randn(1, VOCAB)
    t_fill = t_apply = 0.0
    for t in ids:
        a = time.perf_counter()
        fill()
        b = time.perf_counter()
        apply(logits.clone())
        t_apply += time.perf_counter() - b
        t_fill += b - a
        accept(t)
    return 1e6 * t_fill / len(ids), 1e6 * t_apply / len(ids)


def bench_xgrammar(tok) -> list[tuple]:
    import xgrammar as xgr

    from roofline.engine.structured import GrammarEngine

    start = time.perf_counter()
    compiler = GrammarEngine(tok, VOCAB)._get_compiler()
    rows = [("xgrammar", "tokenizer setup", 1e3 * (time.perf_counter() - start), None, None)]
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    for name, (schema, text) in SCHEMAS.items():
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        ms = 1e3 * (time.perf_counter() - start)
        m = xgr.GrammarMatcher(compiled)
        fill, apply = _walk(lambda: m.fill_next_token_bitmask(bitmask),
                            lambda x: xgr.apply_token_bitmask_inplace(x, bitmask), m.accept_token,
                            tok.encode(text, add_special_tokens=False))
        rows.append(("xgrammar", name, ms, fill, apply))
    start = time.perf_counter()
    compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    rows.append(("xgrammar", "json_object", 1e3 * (time.perf_counter() - start), None, None))
    return rows


def bench_llguidance(tok) -> list[tuple]:
    import llguidance
    import llguidance.torch as lt

    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=VOCAB, eos_token=tok.eos_token_ids)
    rows = [("llguidance", "tokenizer setup", 1e3 * (time.perf_counter() - start), None, None)]
    bitmask = lt.allocate_token_bitmask(1, VOCAB)
    bits = torch.arange(32, dtype=torch.int32)

    def apply(x):  # its own apply is torch.compile'd; the same unpack-and-fill in eager torch
        x.masked_fill_(((bitmask[:, :, None] >> bits) & 1).view(1, -1)[:, :VOCAB] == 0, float("-inf"))

    for name, (schema, text) in SCHEMAS.items():
        start = time.perf_counter()
        m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema))
        ms = 1e3 * (time.perf_counter() - start)
        fill, app = _walk(lambda: lt.fill_next_token_bitmask(m, bitmask), apply, m.consume_token,
                          tok.encode(text, add_special_tokens=False))
        rows.append(("llguidance", name, ms, fill, app))
    return rows


def bench_outlines(tok) -> list[tuple]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    # byte-level BPE: GPT-2's byte <-> printable character table, inverted
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable + [256 + i for i in range(256 - len(printable))]
    byte_of = dict(zip(map(chr, chars), printable + [b for b in range(256) if b not in printable]))
    eos = tok.eos_token_ids[0]
    vocab: dict[bytes, list[int]] = {}
    for i in range(VOCAB):
        t = tok.tokenizer.id_to_token(i)
        if i != eos and t and all(ch in byte_of for ch in t):
            vocab.setdefault(bytes(byte_of[ch] for ch in t), []).append(i)
    voc = Vocabulary(eos, vocab)
    rows = [("outlines-core", "tokenizer setup", 1e3 * (time.perf_counter() - start), None, None)]
    mask = torch.zeros(1, VOCAB // 32, dtype=torch.int32)
    for name, (schema, text) in SCHEMAS.items():
        start = time.perf_counter()
        guide = Guide(Index(build_regex_from_schema(json.dumps(schema)), voc))
        ms = 1e3 * (time.perf_counter() - start)
        compact = json.dumps(json.loads(text), separators=(",", ":"))  # its schema regex has no optional spaces
        fill, _ = _walk(lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4), lambda x: None,
                        guide.advance, tok.encode(compact, add_special_tokens=False))
        rows.append(("outlines-core", name, ms, fill, None))
    return rows


def engines_table() -> None:
    tok = open_model("default").tokenizer()
    rows = []
    for bench in (bench_xgrammar, bench_llguidance, bench_outlines):
        try:
            rows += bench(tok)
        except ImportError as exc:
            print(f"skipped {bench.__name__}: {exc}")
    print(f"{'engine':14} {'grammar':16} {'compile ms':>10} {'fill us/token':>14} {'apply us/row':>13}")
    for engine, name, ms, fill, apply in rows:
        f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"{engine:14} {name:16} {ms:10.1f} {f(fill):>14} {f(apply):>13}")


def decode_share(steps: int) -> None:
    llm = LLM(model="default", kv_cache_memory=64 << 20)
    engine = llm.engine
    rows = engine.runner.structured
    spent = {"mask": 0.0}
    token_mask, accept = rows.token_mask, rows.accept

    def timed(fn):
        def wrapper(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent["mask"] += time.perf_counter() - start
        return wrapper

    import roofline.engine.sampler as sampler
    apply = sampler.apply_token_mask
    rows.token_mask, rows.accept, sampler.apply_token_mask = timed(token_mask), timed(accept), timed(apply)
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}
    results = {}
    for label, spec in (("plain", None), ("json_schema", StructuredSpec.json(schema)),
                        ("plain again", None)):
        params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True, structured=spec)
        engine.add_request(label, "Tell me a story.", params)
        engine.step()  # prefill, first token
        for _ in range(4):  # warm-up decodes
            engine.step()
        spent["mask"] = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        results[label] = ((time.perf_counter() - start) / steps, spent["mask"] / steps)
        engine.abort(label)
        engine.step()
    base = np.mean([results["plain"][0], results["plain again"][0]])
    step, mask = results["json_schema"]
    print(f"batch-1 greedy decode, default model, {steps} steps: plain {1e3 * base:.2f} ms/step, "
          f"json_schema {1e3 * step:.2f} ms/step ({step / base:.3f}x); mask work {1e3 * mask:.3f} ms/step "
          f"= {100 * mask / base:.1f}% of a plain step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", action="store_true", help="also compare the grammar engines installed")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}, {datetime.date.today()}")
    if args.engines:
        engines_table()
    decode_share(args.steps)


if __name__ == "__main__":
    main()
