"""Every error a client can cause, over raw HTTP: OpenAI's error JSON, the right status, never a 500."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

CHAT = [{"role": "user", "content": "Hi"}]


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    """The response is OpenAI's error JSON with this status (and code)."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# --- 401 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic {key}", "Bearer", "Bearer {key}x", "{key}"])
def test_missing_or_wrong_key_is_401(server, header):
    headers = {} if header is None else {"Authorization": header.format(key=server.api_keys[0])}
    with httpx.Client(base_url=server.base_url, headers=headers) as c:
        for resp in (c.get("/v1/models"), c.post("/v1/completions", json={"prompt": "hi"})):
            assert_error(resp, 401, "invalid_api_key")
            assert resp.headers["www-authenticate"] == "Bearer"


def test_every_configured_key_works_and_health_needs_none(server):
    for key in server.api_keys:
        with httpx.Client(base_url=server.base_url, headers={"Authorization": f"bearer {key}"}) as c:
            assert c.get("/v1/models").status_code == 200
    with httpx.Client(base_url=server.base_url) as c:
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


# --- 404 / 405 ---------------------------------------------------------------------------------------------


def test_unknown_model_and_route_are_404(http):
    err = assert_error(http.post("/v1/completions", json={"prompt": "hi", "model": "gpt-4"}), 404, "model_not_found")
    assert "gpt-4" in err["message"] and err["param"] == "model"
    assert_error(http.post("/v1/chat/completions", json={"messages": CHAT, "model": "llama"}), 404, "model_not_found")
    assert_error(http.get("/v1/models/llama"), 404, "model_not_found")
    assert_error(http.get("/v1/nothing-here"), 404, "not_found")
    assert_error(http.get("/nothing-here"), 404, "not_found")
    resp = http.get("/v1/completions")
    assert_error(resp, 405)
    assert resp.headers["allow"] == "POST"  # RFC 9110: a 405 says what is allowed (found by schemathesis)


# --- 400 ---------------------------------------------------------------------------------------------------

BAD_COMPLETIONS = [
    (b"", "invalid_json"),
    (b"{", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b"null", "invalid_json"),
    (b'"prompt"', "invalid_json"),
    (b'{"prompt": "\xff\xfe hi"}', "invalid_json"),  # invalid UTF-8
    (b"\xef\xbb\xbf{}", "invalid_json"),  # UTF-8 BOM
    (b"[" * 200_000, "invalid_json"),  # nesting past the recursion limit
    (b'{"prompt": "\\ud800"}', "invalid_value"),  # lone surrogate
    (b'{"prompt": "hi", "temperature": NaN}', "invalid_value"),
    (b'{"prompt": "hi", "top_p": Infinity}', "invalid_value"),
    (b'{"prompt": {"text": "hi"}}', "invalid_value"),
    (b'{"prompt": 5}', "invalid_value"),
    (b'{"prompt": [1, "a"]}', "invalid_value"),
    (b'{"prompt": []}', "invalid_value"),
    (b'{"prompt": ""}', "invalid_value"),
    (b'{"prompt": [-1]}', "invalid_value"),
    (b'{"prompt": [99999999999]}', "invalid_value"),
    (b'{}', "invalid_value"),
    (b'{"prompt": "hi", "max_tokens": "lots"}', "invalid_value"),
    (b'{"prompt": "hi", "max_tokens": -1}', "invalid_value"),
    (b'{"prompt": "hi", "max_tokens": 0}', "invalid_value"),
    (b'{"prompt": "hi", "max_tokens": 1e300}', "invalid_value"),
    (b'{"prompt": "hi", "n": 0}', "invalid_value"),
    (b'{"prompt": "hi", "n": 1000000000}', "invalid_value"),
    (b'{"prompt": "hi", "n": 100000000000000000000000000000}', "invalid_value"),
    (b'{"prompt": "hi", "temperature": -1}', "invalid_value"),
    (b'{"prompt": "hi", "temperature": "hot"}', "invalid_value"),
    (b'{"prompt": "hi", "top_p": 0}', "invalid_value"),
    (b'{"prompt": "hi", "logprobs": 21}', "invalid_value"),
    (b'{"prompt": "hi", "stop": ""}', "invalid_value"),
    (b'{"prompt": "hi", "stop": [1]}', "invalid_value"),
    (b'{"prompt": "hi", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}',
     "invalid_value"),
    (b'{"prompt": "hi", "seed": 100000000000000000000000}', "invalid_value"),
    (b'{"prompt": "hi", "presence_penalty": 3}', "invalid_value"),
    (b'{"prompt": "hi", "stream": "maybe"}', "invalid_value"),
    (b'{"prompt": "hi", "top_k": 100000000000000000000000}', "invalid_value"),
    (b'{"prompt": "hi", "stop_token_ids": [' + b"1," * 300 + b'1]}', "invalid_value"),
    (b'{"prompt": "hi", "logit_bias": {"5": 1}}', "unsupported_parameter"),
    (b'{"prompt": "hi", "suffix": "end"}', "unsupported_parameter"),
    (b'{"prompt": "hi", "best_of": 3}', "unsupported_parameter"),
    (b'{"prompt": "hi", "processed_logprobs": true}', "invalid_value"),
    (b'{"prompt": ["a", "b"], "n": 100}', "invalid_value"),
]


@pytest.mark.parametrize("body,code", BAD_COMPLETIONS, ids=[repr(b[:40]) for b, _ in BAD_COMPLETIONS])
def test_bad_completion_requests_are_400(http, body, code):
    assert_error(http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}), 400, code)


BAD_CHATS = [
    ({"messages": []}, "invalid_value"),
    ({"messages": "hi"}, "invalid_value"),
    ({"messages": [{"content": "hi"}]}, "invalid_value"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value"),
    ({"messages": [{"role": "user"}]}, "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "unsupported_content"),
    ({"messages": [{"role": "tool", "tool_call_id": "a"}]}, "invalid_value"),
    ({"messages": CHAT, "functions": [{"name": "f"}]}, "unsupported_parameter"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, "invalid_value"),
    ({"messages": CHAT, "response_format": {"type": "xml"}}, "invalid_value"),
    ({"messages": CHAT, "top_logprobs": 3}, "invalid_value"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 50}, "invalid_value"),
    ({"messages": CHAT, "max_tokens": 0}, "invalid_value"),
    ({"messages": CHAT, "max_completion_tokens": 10**15}, "context_length_exceeded"),
    ({"messages": CHAT, "n": 129}, "invalid_value"),
    ({"messages": CHAT, "temperature": 2.5}, "invalid_value"),
    ({"messages": CHAT, "top_k": -2}, "invalid_value"),
    ({"messages": CHAT, "repetition_penalty": 0}, "invalid_value"),
]


@pytest.mark.parametrize("body,code", BAD_CHATS, ids=[json.dumps(b)[:50] for b, _ in BAD_CHATS])
def test_bad_chat_requests_are_400(http, body, code):
    assert_error(http.post("/v1/chat/completions", json=body), 400, code)


# (route, body, the field the error must name): values of the wrong JSON type, which were once coerced
WRONG_TYPES = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),  # was 1
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5.5}, "max_tokens"),  # a whole 5.0 is accepted as 5
    ("/v1/completions", {"prompt": "hi", "n": "2"}, "n"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),  # was a stream
    ("/v1/completions", {"prompt": "hi", "stream": 1}, "stream"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": False}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "seed": 1.5}, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": "true"}, "echo"),
    ("/v1/completions", {"prompt": "hi", "top_k": "40"}, "top_k"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": "true"}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "n": "2"}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": "5"}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages.0.name"),
]


@pytest.mark.parametrize("route,body,field", WRONG_TYPES, ids=[json.dumps(b)[-40:] for _, b, _ in WRONG_TYPES])
def test_values_of_the_wrong_json_type_are_400_naming_the_field(http, route, body, field):
    err = assert_error(http.post(route, json=body), 400, "invalid_value")
    assert err["type"] == "invalid_request_error"
    assert err["param"] == field and err["message"].startswith(f"{field}: "), err


def test_integers_are_valid_numbers(http):
    numbers = {"max_tokens": 1, "temperature": 1, "top_p": 1, "presence_penalty": 0, "min_p": 0,
               "repetition_penalty": 1}
    assert http.post("/v1/completions", json={"prompt": "hi", **numbers}).status_code == 200
    assert http.post("/v1/chat/completions", json={"messages": CHAT, **numbers}).status_code == 200


def test_context_overflow_says_token_count_and_limit(server, http):
    limit = server.ctx.max_model_len
    prompt = "hello " * (limit + 10)
    num_tokens = len(server.ctx.tokenizer.encode(prompt))
    err = assert_error(http.post("/v1/completions", json={"prompt": prompt}), 400, "context_length_exceeded")
    assert str(num_tokens) in err["message"] and str(limit) in err["message"] and err["param"] == "prompt"
    err = assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}]}),
                       400, "context_length_exceeded")
    assert str(limit) in err["message"] and err["param"] == "messages"
    err = assert_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": limit}), 400,
                       "context_length_exceeded")
    assert str(limit) in err["message"]
    # in a stream the error comes before any event, as a status
    err = assert_error(http.post("/v1/completions", json={"prompt": prompt, "stream": True}), 400,
                       "context_length_exceeded")


def test_unknown_fields_are_ignored(http):
    resp = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "frobnicate": True, "user": "u1",
                                              "metadata": {"a": 1}})
    assert resp.status_code == 200


# --- 413 ---------------------------------------------------------------------------------------------------


def test_body_over_the_limit_is_413(server, http):
    limit = server.ctx.config.max_body_bytes
    big = json.dumps({"prompt": "x" * (limit + 1)}).encode()
    assert_error(http.post("/v1/completions", content=big), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    with server.client() as c:
        assert_error(c.post("/v1/completions", content=chunks()), 413, "request_too_large")
    assert http.get("/health").status_code == 200


# --- 429 / 503 ---------------------------------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after(server, http):
    engine = server.ctx.engine
    saved = engine.max_queue
    engine.max_queue = 0  # every new request finds the queue full
    try:
        resp = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert_error(resp, 429, "queue_full")
        assert int(resp.headers["retry-after"]) >= 0
        resp = http.post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
        assert_error(resp, 429, "queue_full")
    finally:
        engine.max_queue = saved
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_draining_is_503(server, http):
    drain = server.ctx.drain
    drain.is_draining = True
    try:
        resp = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert_error(resp, 503, "draining")
        assert "retry-after" in resp.headers
        assert http.get("/health").status_code == 503
        assert http.get("/metrics").status_code == 200
    finally:
        drain.is_draining = False
    assert http.get("/health").status_code == 200


# --- robustness --------------------------------------------------------------------------------------------


def test_no_junk_input_makes_a_500(server, http):
    junk = [b"\x00" * 100, b"{" * 10_000, b'{"prompt": "' + b"\xc3" * 1000 + b'"}', b'{"prompt": null}',
            b'{"messages": null}', b'{"prompt": true}', b'{"prompt": [[1, 2], [3]], "n": 2, "max_tokens": 1}',
            b'{"prompt": [[]]}', b'{"prompt": "hi", "stream_options": 5}', b'{"prompt": "hi", "stop_token_ids": "x"}',
            b'{"prompt": "hi", "priority": 1e40}', b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            b'{"messages": [{"role": "assistant", "content": null}], "max_tokens": 1}',
            b'{"prompt": "hi", "max_tokens": true}',
            b'{"prompt": "hi", "max_tokens": 2, "temperature": 1e-300, "top_k": 2000000000, "min_p": 1, "seed": -1}',
            b'{"prompt": "hi", "max_tokens": 2, "repetition_penalty": 10, "presence_penalty": -2, "top_p": 1e-9}']
    for route in ("/v1/completions", "/v1/chat/completions"):
        for body in junk:
            resp = http.post(route, content=body)
            assert resp.status_code < 500, (route, body[:60], resp.text)
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # a header no client library would send
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    assert http.get("/health").json() == {"status": "ok"}


def test_a_conversation_far_past_the_context_is_refused_before_tokenizing(server, http, monkeypatch):
    tok = server.ctx.tokenizer
    calls = []
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(1) or [])  # must not be reached
    text = "word " * (server.ctx.max_model_len * tok.max_token_bytes // 5 + 1)
    resp = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "max_tokens": 1})
    assert_error(resp, 400, "context_length_exceeded")
    assert "at least" in resp.json()["error"]["message"] and not calls
