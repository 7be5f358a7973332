"""Request parsing rules and the JSON shape of responses (extension fields vanish when unset)."""

import json

import pytest
from pydantic import ValidationError

from roofline.server.protocol import (ChatCompletionRequest, ChatDelta, ChatTokenLogprob, CompletionLogprobs,
                                      CompletionRequest, ErrorInfo, ErrorResponse)


def test_requests_ignore_unknown_fields_and_reject_non_finite_numbers():
    req = CompletionRequest.model_validate({"prompt": "hi", "frobnicate": 1, "top_k": 5})
    assert req.top_k == 5 and req.max_tokens == 16 and req.n == 1
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "hi", "temperature": float("nan")})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": []})


CHAT = [{"role": "user", "content": "x"}]


# JSON values of the wrong type, once coerced ("5" -> 5, true -> 1, "yes" -> True)
@pytest.mark.parametrize("field,value", [
    ("max_tokens", "5"), ("max_tokens", True), ("max_tokens", 5.5), ("max_tokens", 1e300), ("n", "2"),
    ("stream", "yes"), ("stream", 1), ("temperature", "0.5"), ("temperature", True), ("seed", 1.5),
    ("stop", 5), ("logprobs", True), ("logprobs", "3"), ("echo", 0), ("user", 5), ("stop_token_ids", ["1"]),
])
def test_completion_fields_are_not_coerced(field, value):
    with pytest.raises(ValidationError) as exc:
        CompletionRequest.model_validate({"prompt": "hi", field: value})
    assert exc.value.errors()[0]["loc"][0] == field


def test_a_whole_number_is_an_integer_as_in_json_schema():
    req = CompletionRequest.model_validate({"prompt": [1.0, 2], "max_tokens": 5.0, "n": 2.0, "seed": -3.0})
    assert (req.prompt, req.max_tokens, req.n, req.seed) == ([1, 2], 5, 2, -3)
    assert all(type(v) is int for v in (req.max_tokens, req.n, req.seed, *req.prompt))


@pytest.mark.parametrize("body,loc", [
    ({"logprobs": "true"}, ("logprobs",)),
    ({"logprobs": True, "top_logprobs": "3"}, ("top_logprobs",)),
    ({"stream_options": {"include_usage": 1}}, ("stream_options", "include_usage")),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, ("messages", 0, "content")),
])
def test_chat_fields_are_not_coerced(body, loc):
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate({"messages": CHAT, **body})
    assert exc.value.errors()[0]["loc"][:len(loc)] == loc


def test_integers_are_numbers_and_every_json_form_still_parses():
    req = CompletionRequest.model_validate({"prompt": [[1], [2]], "temperature": 1, "top_p": 1, "min_p": 0,
                                            "logit_bias": {}, "stop": ["a"], "stop_token_ids": [2], "seed": -1})
    assert req.temperature == 1.0 and isinstance(req.temperature, float) and req.seed == -1
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": None, "name": "bot"}]
    chat = ChatCompletionRequest.model_validate({
        "messages": messages, "logprobs": True, "top_logprobs": 2, "tools": [], "tool_choice": "none",
        "response_format": {"type": "text"}, "stream": True, "stream_options": {"include_usage": False}})
    assert chat.messages[1].content[0].text == "hi" and chat.top_logprobs == 2


def test_prompt_forms():
    for prompt in ("a", ["a", "b"], [1, 2], [[1], [2, 3]]):
        assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": [1, "a"]})


def test_stop_list_and_usage_flag():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "stop": "END",
                                                "stream": True, "stream_options": {"include_usage": True}})
    assert req.stop_list() == ["END"] and req.include_usage


def test_extension_fields_are_omitted_when_unset():
    entry = ChatTokenLogprob(token="a", logprob=-1.0, bytes=[97])
    assert "processed_logprob" not in json.loads(entry.model_dump_json())
    entry.processed_logprob = -0.5
    assert json.loads(entry.model_dump_json())["processed_logprob"] == -0.5
    assert "processed_token_logprobs" not in json.loads(CompletionLogprobs().model_dump_json())
    assert json.loads(ChatDelta(content="x").model_dump_json()) == {"content": "x"}
    assert json.loads(ChatDelta().model_dump_json()) == {}


def test_error_shape():
    body = json.loads(ErrorResponse(error=ErrorInfo(message="m", type="t")).model_dump_json())
    assert body == {"error": {"message": "m", "type": "t", "param": None, "code": None}}
