"""POST /v1/embeddings: OpenAI's shapes, encodings, dimensions, usage, order, errors, and exactness."""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest
import torch

from roofline import LLM

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "Hi"]


def vectors(body: dict) -> list[np.ndarray]:
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "embedding" for d in body["data"])
    return [np.asarray(d["embedding"], dtype=np.float64) for d in body["data"]]


def embed(http, **fields) -> dict:
    r = http.post("/v1/embeddings", json=fields)
    assert r.status_code == 200, r.text
    return r.json()


def test_shape_normalization_usage_and_order(server, http):
    body = embed(http, input=TEXTS, model=server.model)
    assert body["object"] == "list" and body["model"] == server.model
    got = vectors(body)
    hidden = server.ctx.engine.engine.model_config.hidden_size
    assert [v.shape for v in got] == [(hidden,)] * len(TEXTS)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in got)
    counts = [http.post("/tokenize", json={"prompt": t}).json()["count"] for t in TEXTS]
    assert body["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
    for text, v in zip(TEXTS, got):  # each alone gives its vector from the batch, in order
        (alone,) = vectors(embed(http, input=text))
        assert np.abs(alone - v).max() < 1e-5
    assert np.abs(got[0] - got[1]).max() > 1e-2  # different texts, different vectors


def test_token_ids_give_the_texts_vectors(http):
    ids = [http.post("/tokenize", json={"prompt": t}).json()["tokens"] for t in TEXTS[:2]]
    by_text = vectors(embed(http, input=TEXTS[:2]))
    by_ids = vectors(embed(http, input=ids))
    (single,) = vectors(embed(http, input=ids[0]))
    for a, b in zip(by_text, by_ids):
        assert np.abs(a - b).max() < 1e-5
    assert np.abs(single - by_text[0]).max() < 1e-5


def test_base64_is_little_endian_float32_of_the_floats(http):
    floats = vectors(embed(http, input=TEXTS[0]))[0]
    encoded = embed(http, input=TEXTS[0], encoding_format="base64")["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.shape == floats.shape
    assert np.abs(decoded - floats).max() < 1e-6


def test_dimensions_truncate_then_renormalize(server, http):
    full = vectors(embed(http, input=TEXTS[1]))[0]
    (short,) = vectors(embed(http, input=TEXTS[1], dimensions=64))
    assert short.shape == (64,)
    assert np.abs(short - full[:64] / np.linalg.norm(full[:64])).max() < 1e-5
    hidden = server.ctx.engine.engine.model_config.hidden_size
    assert len(embed(http, input="x", dimensions=hidden)["data"][0]["embedding"]) == hidden


def test_mean_pooling_is_another_vector(http):
    last = vectors(embed(http, input=TEXTS[0]))[0]
    mean = vectors(embed(http, input=TEXTS[0], pooling="mean"))[0]
    assert abs(np.linalg.norm(mean) - 1) < 1e-5 and np.abs(mean - last).max() > 1e-2


@pytest.mark.parametrize("fields, status, code, param", [
    ({"input": []}, 400, "invalid_value", "input"),
    ({"input": ""}, 400, "invalid_value", "input"),
    ({"input": ["a", ""]}, 400, "invalid_value", "input"),
    ({"input": [[1, 2], []]}, 400, "invalid_value", "input"),
    ({"input": [10**9]}, 400, "invalid_value", "input"),
    ({"input": "x", "dimensions": 100000}, 400, "invalid_value", "dimensions"),
    ({"input": "x", "dimensions": 0}, 400, "invalid_value", "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, 400, "invalid_value", "encoding_format"),
    ({"input": "x", "pooling": "cls"}, 400, "invalid_value", "pooling"),
    ({"input": "x", "model": "gpt-4"}, 404, "model_not_found", "model"),
    ({"input": [1] * 100000}, 400, "context_length_exceeded", "input"),
])
def test_errors_are_one_line_openai_json(http, fields, status, code, param):
    r = http.post("/v1/embeddings", json=fields)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert "\n" not in error["message"] and "Traceback" not in error["message"]


def test_embeddings_need_the_api_key(server):
    with server.client(headers={"Authorization": "Bearer wrong"}) as c:
        r = c.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_embeddings_are_counted_in_metrics(http):
    embed(http, input=["a b c", "d e"], pooling="mean")
    text = http.get("/metrics").text
    assert 'roofline_embedding_inputs_total{pooling="mean"}' in text
    assert 'roofline_requests_total{route="/v1/embeddings",status="200"}' in text


# --- exactness on a tiny fp32 model, chunked, beside a streaming generation -------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, reference, start_server):
    path = str(tmp_path_factory.mktemp("embed-server-model"))
    reference.save_tiny_model(reference.specs["qwen2-bias-3heads-mqa-tied"], path, seed=4)
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=128,
              max_num_batched_tokens=16)
    with start_server(llm, model_name="tiny") as live:
        yield live, reference.load_hf_reference(path)


def test_vectors_match_transformers_while_generation_streams(tiny, reference):
    live, hf = tiny
    prompts = [reference.random_prompt(n, seed=n) for n in (5, 37, 90)]
    with live.client() as c:
        streaming = []

        def generate() -> None:
            with c.stream("POST", "/v1/completions", json={"prompt": [7, 8, 9], "max_tokens": 40, "stream": True,
                                                            "ignore_eos": True,
                                                            "stream_options": {"include_usage": True}}) as r:
                streaming.extend(line for line in r.iter_lines() if line.startswith("data: {"))

        thread = threading.Thread(target=generate)
        thread.start()
        bodies = {p: c.post("/v1/embeddings", json={"input": prompts, "pooling": p}).json() for p in ("last", "mean")}
        thread.join(60)
    # the generation ran to its end beside the embeddings (snapshots may merge, so tokens are counted in usage)
    assert json.loads(streaming[-1][len("data: "):])["usage"]["completion_tokens"] == 40
    with torch.inference_mode():
        for pooling, body in bodies.items():
            assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))
            for ids, d in zip(prompts, body["data"]):
                hidden = hf.model(torch.tensor([ids])).last_hidden_state[0]
                want = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
                got = torch.tensor(d["embedding"])
                assert (got - want / want.norm()).abs().max().item() <= 1e-5
