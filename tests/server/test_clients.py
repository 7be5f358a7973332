"""Real clients against the served default model (issue 15 item 6): the official openai SDK and LangChain.

LangChain's OpenAIEmbeddings tokenizes with tiktoken by default and sends token ids; tiktoken's encodings
are downloaded on first use (never here) and are not the served model's ids anyway. So its token-id path
runs with tiktoken's lookup answered by the served model's tokenizer, its length-safe text path with
tiktoken_enabled=False and that tokenizer (it then sends text chunks), and raw texts with
check_embedding_ctx_length=False.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel, Field


langchain_openai = pytest.importorskip("langchain_openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten slept on the rug."]


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    is_capital: bool  # an unbounded integer lets a tiny model emit digits up to max_tokens


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=20)
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


def _chat(server, **kwargs):
    return langchain_openai.ChatOpenAI(model=server.model, base_url=f"{server.base_url}/v1", api_key=server.api_keys[0],
                                       max_retries=0, timeout=60, temperature=0, **kwargs)


def _embeddings(server, **kwargs):
    return langchain_openai.OpenAIEmbeddings(model=server.model, base_url=f"{server.base_url}/v1",
                                             api_key=server.api_keys[0], max_retries=0, **kwargs)


def test_openai_embeddings_create(server, oai):
    got = oai.embeddings.create(model=server.model, input=TEXTS)  # the SDK asks for base64 and decodes it
    floats = oai.embeddings.create(model=server.model, input=TEXTS, encoding_format="float")
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == server.model
    for a, b in zip(got.data, floats.data):
        assert np.abs(np.asarray(a.embedding) - np.asarray(b.embedding)).max() < 1e-6
        assert abs(np.linalg.norm(a.embedding) - 1) < 1e-5
    assert got.usage.prompt_tokens == got.usage.total_tokens > 0
    short = oai.embeddings.create(model=server.model, input=TEXTS[0], dimensions=32)
    assert len(short.data[0].embedding) == 32
    ids = server.ctx.tokenizer.encode(TEXTS[0])
    by_ids = oai.embeddings.create(model=server.model, input=[ids], encoding_format="float")
    assert np.abs(np.asarray(by_ids.data[0].embedding) - np.asarray(floats.data[0].embedding)).max() < 1e-5


def test_openai_streamed_forced_tool_call(oai):
    stream = oai.chat.completions.create(model="default", messages=ASK, tools=[WEATHER], max_tokens=60,
                                         temperature=0, stream=True,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    names, args, finishes = [], [], []
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                names.append(call.function.name)
                args.append(call.function.arguments or "")
            finishes.append(choice.finish_reason)
    assert "get_weather" in names
    jsonschema.validate(json.loads("".join(args)), WEATHER["function"]["parameters"])
    assert [f for f in finishes if f] == ["tool_calls"]


def test_langchain_structured_output_json_schema(server):
    llm = _chat(server, max_tokens=80).with_structured_output(City, method="json_schema")
    city = llm.invoke("Name a large city in Japan.")
    assert isinstance(city, City)
    City.model_validate(city.model_dump())


def test_langchain_bind_tools_forced_call(server):
    llm = _chat(server, max_tokens=60).bind_tools([GetWeather], tool_choice="GetWeather")
    message = llm.invoke("What is the weather in Paris?")
    assert [c["name"] for c in message.tool_calls] == ["GetWeather"]
    GetWeather.model_validate(message.tool_calls[0]["args"])
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_langchain_embeddings_both_paths(server, tmp_path):
    raw = _embeddings(server, check_embedding_ctx_length=False).embed_documents(TEXTS)
    # the length-safe path, on the served model's own tokenizer (saved where transformers can load it)
    server.ctx.tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    safe = _embeddings(server, tiktoken_enabled=False, tiktoken_model_name=str(tmp_path))
    chunked = safe.embed_documents(TEXTS)
    query = safe.embed_query(TEXTS[0])
    hidden = server.ctx.engine.engine.model_config.hidden_size
    assert [len(v) for v in raw] == [len(v) for v in chunked] == [hidden] * 3 and len(query) == hidden
    for a, b in zip(raw, chunked):  # one chunk per text: the same vector, renormalized by LangChain
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-4
    assert np.abs(np.asarray(query) - np.asarray(chunked[0])).max() < 1e-4


class _ServedEncoding:
    """What LangChain asks of a tiktoken encoding, answered with the served model's token ids."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.sent: list[list[int]] = []

    def encode_ordinary(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        self.sent.append(ids)
        return ids


def test_langchain_embeddings_send_token_ids(server, oai, monkeypatch):
    tiktoken = langchain_openai.embeddings.base.tiktoken
    encoding = _ServedEncoding(server.ctx.tokenizer)
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: encoding)
    got = _embeddings(server).embed_documents(TEXTS)  # the default: length-checked, token ids on the wire
    assert [len(ids) for ids in encoding.sent] == [len(server.ctx.tokenizer.encode(t)) for t in TEXTS]
    want = oai.embeddings.create(model=server.model, input=TEXTS, encoding_format="float").data
    for a, b in zip(got, want):
        assert np.abs(np.asarray(a) - np.asarray(b.embedding)).max() < 1e-4
    # a text longer than embedding_ctx_length goes as several token-id chunks, averaged by LangChain
    (long,) = _embeddings(server, embedding_ctx_length=4).embed_documents([TEXTS[0]])
    assert abs(np.linalg.norm(long) - 1) < 1e-5 and np.abs(np.asarray(long) - np.asarray(got[0])).max() > 1e-3
