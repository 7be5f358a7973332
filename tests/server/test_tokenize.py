"""POST /tokenize and /detokenize on the live server: vLLM's shapes, the engine's own token ids, clean errors."""

from __future__ import annotations

import httpx


def test_tokenize_a_prompt_gives_the_engines_ids_and_detokenize_inverts_it(server, http):
    tok = server.ctx.tokenizer
    r = http.post("/tokenize", json={"prompt": "The capital of France is", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("The capital of France is")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == server.ctx.max_model_len
    assert "".join(body["token_strs"]).replace("Ġ", " ").endswith("France is")
    r = http.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "The capital of France is"}
    assert "token_strs" not in http.post("/tokenize", json={"prompt": "hi"}).json()


def test_tokenize_messages_renders_the_chat_template_like_chat_completions(server, http):
    tok = server.ctx.tokenizer
    messages = [{"role": "user", "content": "Hi there"}]
    r = http.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    expected = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    assert r.json()["tokens"] == expected
    # the prompt tokens a chat completion reports are the same ids
    chat = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == len(expected)


def test_tokenize_errors_are_openai_json(server, http):
    for body, param in [({}, "prompt"), ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
                        ({"prompt": 5}, "prompt"), ({"prompt": "a", "model": "other"}, "model")]:
        r = http.post("/tokenize", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (body, r.text)
    r = http.post("/detokenize", json={"tokens": [1, 10**9]})
    assert r.status_code == 400 and "tokens[1]" in r.json()["error"]["message"]


def test_tokenize_needs_the_api_key(server):
    r = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 401
