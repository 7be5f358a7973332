"""Structured outputs over HTTP on the default model: response_format (json_object, json_schema), guided_regex and
guided_grammar on chat and completions, streamed and not, n > 1, the official client's parse(), and the 400s."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

pytest.importorskip("xgrammar")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 2}},
    "required": ["name", "age", "pets"]}
ASK = [{"role": "user", "content": "Describe a person called Ada who is 36 and has a cat, as JSON."}]


def json_schema_format(schema: dict, name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_chat_json_schema_validates(http):
    body = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 60, "temperature": 0,
                                                   "response_format": json_schema_format(PERSON)}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_chat_n_samples_validate_each(http):
    body = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 60, "n": 2, "temperature": 1.0,
                                                   "seed": 5, "response_format": json_schema_format(PERSON)}).json()
    assert len(body["choices"]) == 2
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_chat_json_schema_streams_valid_json_per_choice(http):
    events = []
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": ASK, "max_tokens": 60, "temperature": 0.8, "seed": 2, "n": 2, "stream": True,
            "response_format": json_schema_format(PERSON)}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    texts, finishes = ["", ""], [[], []]
    for choice in (c for e in events for c in e["choices"]):
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finishes[choice["index"]].append(choice["finish_reason"])
    assert finishes == [["stop"], ["stop"]]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_chat_json_object_is_an_object(http):
    body = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Give me a JSON object with a key 'color' set to 'blue'."}],
        "max_tokens": 100, "temperature": 0, "response_format": {"type": "json_object"}}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_completions_json_schema_regex_and_grammar(http):
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 100}},
              "required": ["answer"]}
    body = http.post("/v1/completions", json={"prompt": "What is 2 + 2? Answer in JSON:", "max_tokens": 30,
                                              "temperature": 0, "response_format": json_schema_format(schema, "a")})
    choice = body.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["text"]), schema)
    body = http.post("/v1/completions", json={"prompt": "Today's date:", "max_tokens": 30, "temperature": 0.8,
                                              "seed": 1, "guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}).json()
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", body["choices"][0]["text"])
    assert body["choices"][0]["finish_reason"] == "stop"
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    body = http.post("/v1/completions", json={"prompt": "Is the sky blue?", "max_tokens": 30, "temperature": 0,
                                              "guided_grammar": grammar}).json()
    assert body["choices"][0]["text"] in ("The answer is yes.", "The answer is no.")


def test_masked_tokens_keep_their_raw_logprobs(http):
    body = http.post("/v1/chat/completions", json={
        "messages": ASK, "max_tokens": 60, "temperature": 0, "logprobs": True, "top_logprobs": 3,
        "response_format": json_schema_format(PERSON)}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert content and all(item["logprob"] <= 0 for item in content)
    # the first token must be '{': the raw model's own favourite is often something else, still listed in the top 3
    first = content[0]
    assert first["token"].startswith("{")
    assert [t["logprob"] for t in first["top_logprobs"]] == sorted((t["logprob"] for t in first["top_logprobs"]),
                                                                   reverse=True)


class Pet(BaseModel):
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)


def test_openai_client_parse_with_a_pydantic_model(oai):
    completion = oai.beta.chat.completions.parse(
        model="default", messages=[{"role": "user", "content": "Invent a pet."}], response_format=Pet,
        max_tokens=80, temperature=0)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Pet)


BAD = [
    ({"response_format": {"type": "xml"}}, "invalid_value", "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "invalid_value", "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}, "invalid_value",
     "response_format.json_schema.name"),
    ({"response_format": json_schema_format({"type": "foo"})}, "invalid_value", None),
    ({"guided_regex": "[a-"}, "invalid_value", None),
    ({"guided_grammar": 'item ::= "a"'}, "invalid_value", None),
    ({"guided_regex": "a+", "guided_grammar": 'root ::= "a"'}, "invalid_value", "guided_grammar"),
]


@pytest.mark.parametrize("fields,code,param", BAD, ids=[json.dumps(f)[:50] for f, _, _ in BAD])
def test_bad_constraints_are_400(http, fields, code, param):
    resp = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, **fields})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == code and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param


def test_missing_grammar_engine_is_a_400_naming_the_extra(http, monkeypatch):
    from roofline.openai import structured

    monkeypatch.setattr(structured, "grammar_available", lambda: False)
    for route, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "hi"})):
        resp = http.post(route, json={**body, "max_tokens": 5, "response_format": {"type": "json_object"}})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "grammar_engine_missing"
        assert "roofline[grammar]" in resp.json()["error"]["message"]
    # text is no constraint: it needs no grammar engine
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                              "response_format": {"type": "text"}}).status_code == 200
