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
