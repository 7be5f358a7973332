"""llama.cpp batched greedy decoding through llama-cpp-python's low-level API (the `batched` example's loop).

Sequences run in waves of `concurrency`: one llama_decode per prefill chunk, then one llama_decode
per step holding one token of every sequence in the wave. Used by bench/throughput.py.
"""

from __future__ import annotations

import time

import numpy as np


def _clear_kv(llama_cpp, ctx) -> None:
    if hasattr(llama_cpp, "llama_memory_clear"):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    elif hasattr(llama_cpp, "llama_kv_self_clear"):
        llama_cpp.llama_kv_self_clear(ctx)
    else:
        llama_cpp.llama_kv_cache_clear(ctx)


def run_batched(llama_cpp, path: str, prompts: list[list[int]], gen_len: int, concurrency: int,
                num_threads: int) -> dict:
    """Greedy-generate `gen_len` tokens for every prompt; returns total/generated/decode tokens per second."""
    from llama_cpp import Llama

    prompt_len = len(prompts[0])
    n_ctx = concurrency * (prompt_len + gen_len) + 16
    n_batch = max(512, concurrency)
    # The high-level Llama object loads the weights; the context is made here because llama-cpp-python
    # 0.3.36 does not pass n_seq_max on to it (its context then holds a single sequence).
    llm = Llama(path, n_ctx=256, n_threads=num_threads, n_threads_batch=num_threads, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
    params.n_seq_max = concurrency
    params.n_threads = params.n_threads_batch = num_threads
    params.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    n_vocab = llm.n_vocab()
    batch = llama_cpp.llama_batch_init(n_batch, 0, concurrency)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        # entries: (token, position, sequence, wants_logits)
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    decode_time = 0.0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), concurrency):
        wave = prompts[start:start + concurrency]
        _clear_kv(llama_cpp, ctx)
        entries = [(tok, pos, s, pos == prompt_len - 1) for s, p in enumerate(wave) for pos, tok in enumerate(p)]
        last_rows = {}
        for chunk_start in range(0, len(entries), n_batch):
            chunk = entries[chunk_start:chunk_start + n_batch]
            decode(chunk)
            for i, (_, _, s, wants) in enumerate(chunk):
                if wants:
                    last_rows[s] = argmax(i)
        tokens = [last_rows[s] for s in range(len(wave))]
        ts = time.perf_counter()
        for step in range(gen_len - 1):
            decode([(tokens[s], prompt_len + step, s, True) for s in range(len(wave))])
            tokens = [argmax(i) for i in range(len(wave))]
        decode_time += time.perf_counter() - ts
    wall = time.perf_counter() - t0
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    total = len(prompts) * (prompt_len + gen_len)
    return {"total_tps": total / wall, "gen_tps": len(prompts) * gen_len / wall,
            "decode_tps": len(prompts) * (gen_len - 1) / decode_time, "wall": wall}
