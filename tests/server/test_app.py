"""The live server driven by the official OpenAI client: completions and chat, streamed and not."""

from __future__ import annotations

import math
import time

import httpx
import pytest

from roofline.server import create_app

PROMPT = "Hello, my name is"
CHAT = [{"role": "user", "content": "Name three colours."}]


def test_models_lists_the_served_model(server, oai, http):
    models = oai.models.list().data
    assert [m.id for m in models] == [server.model] == ["SmolLM2-135M-Instruct"]
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == server.ctx.max_model_len
    assert http.get(f"/v1/models/{server.model}").json()["id"] == server.model
    assert http.get("/health").json() == {"status": "ok"}


def test_completion_greedy(server, oai):
    out = oai.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == server.model
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens == len(server.ctx.tokenizer.encode(PROMPT))
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    # "default" names the same model; token ids are a prompt too
    again = oai.completions.create(model="default", prompt=server.ctx.tokenizer.encode(PROMPT), max_tokens=6,
                                   temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == choice.text


def test_completion_stream_matches_non_stream(server, oai):
    kwargs = dict(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    full = oai.completions.create(**kwargs)
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_matches_non_stream(server, oai):
    full = oai.chat.completions.create(model=server.model, messages=CHAT, max_tokens=10, temperature=0)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.usage.completion_tokens <= 10
    stream = oai.chat.completions.create(model=server.model, messages=CHAT, max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_text_parts_and_developer_role(server, oai):
    as_string = oai.chat.completions.create(model=server.model, max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    as_parts = oai.chat.completions.create(model=server.model, max_tokens=5, temperature=0, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_max_completion_tokens_wins(server, oai):
    out = oai.chat.completions.create(model=server.model, messages=CHAT, max_tokens=9, max_completion_tokens=3,
                                      extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_seed_makes_sampling_reproducible(server, oai):
    def sample(seed):
        return oai.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                      seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(123) == sample(123)
    assert len({sample(s) for s in (1, 2, 3)}) > 1
    chat = [oai.chat.completions.create(model=server.model, messages=CHAT, max_tokens=8, temperature=1.0, seed=7)
            .choices[0].message.content for _ in range(2)]
    assert chat[0] == chat[1]


def test_n_choices_and_prompt_lists(server, oai):
    out = oai.completions.create(model=server.model, prompt=PROMPT, n=3, max_tokens=4, seed=1,
                                 extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(server.ctx.tokenizer.encode(PROMPT))
    two = oai.completions.create(model=server.model, prompt=[PROMPT, "The sky is"], n=2, max_tokens=3,
                                 temperature=0, extra_body={"ignore_eos": True})
    by_index = {c.index: c.text for c in two.choices}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy samples of one prompt agree
    single = oai.completions.create(model=server.model, prompt="The sky is", max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert by_index[2] == single.choices[0].text
    chat = oai.chat.completions.create(model=server.model, messages=CHAT, n=2, max_tokens=4, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]
    streamed = oai.chat.completions.create(model=server.model, messages=CHAT, n=2, max_tokens=4, seed=3,
                                           stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in chat.choices]


def test_stop_strings(server, oai):
    base = oai.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = " " + words[2]
    expected = base[:base.index(stop)]
    out = oai.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                      stream=True)
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_completion_logprobs_are_the_raw_distribution(server, oai):
    out = oai.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                 extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(5)]
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 4 and top[token] == chosen
        assert chosen == max(top.values())  # greedy picks the most likely token
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-4


def test_chat_logprobs_ignore_temperature_and_processed_is_an_extension(server, oai, http):
    def first_token(temperature, **extra):
        out = oai.chat.completions.create(model=server.model, messages=CHAT, max_tokens=1, temperature=temperature,
                                          seed=0, logprobs=True, top_logprobs=5, extra_body=extra)
        return out.choices[0].logprobs.content[0]

    cold, hot = first_token(0.0), first_token(1.8)
    assert [(t.token, t.logprob) for t in cold.top_logprobs] == [(t.token, t.logprob) for t in hot.top_logprobs]
    assert len(cold.top_logprobs) == 5 and cold.top_logprobs[0].logprob >= cold.top_logprobs[-1].logprob
    assert cold.bytes == list(cold.token.encode())
    assert not hasattr(cold, "processed_logprob") or cold.processed_logprob is None
    hot = first_token(1.8, processed_logprobs=True)
    assert hot.processed_logprob is not None and hot.processed_logprob != pytest.approx(hot.logprob)
    # raw JSON: the extension field is absent unless asked for
    body = {"messages": CHAT, "max_tokens": 1, "logprobs": True}
    entry = http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["top_logprobs"] == []
    comp = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "logprobs": 1,
                                              "processed_logprobs": True}).json()
    assert len(comp["choices"][0]["logprobs"]["processed_token_logprobs"]) == 2


def test_echo_returns_prompt_logprobs(server, oai):
    ids = server.ctx.tokenizer.encode(PROMPT)
    out = oai.completions.create(model=server.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    more = oai.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, echo=True, logprobs=1,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert more.choices[0].text.startswith(PROMPT) and len(more.choices[0].logprobs.tokens) == len(ids) + 2
    assert more.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(choice.logprobs.token_logprobs[1:])
    streamed = list(oai.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, echo=True,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == more.choices[0].text


def test_streamed_chat_logprobs_cover_every_token(server, oai):
    chunks = list(oai.chat.completions.create(model=server.model, messages=CHAT, max_tokens=6, logprobs=True,
                                              top_logprobs=2, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(e.token for e in entries).startswith(text)


def _num_requests(server, route: str, status: int) -> float:
    value = server.ctx.metrics.registry.get_sample_value("roofline_requests_total",
                                                         {"route": route, "status": str(status)})
    return value or 0.0


def test_metrics_label_requests_by_route_template(server, http):
    """Every served route has its own label, its template and never the raw path; unknown paths are "other"."""
    calls = [("/v1/models/{model}", 200, lambda c: c.get(f"/v1/models/{server.model}")),
             ("/v1/models/{model}", 404, lambda c: c.get("/v1/models/some/other-model")),
             ("/v1/models/{model}", 401, lambda c: httpx.get(f"{server.base_url}/v1/models/x")),
             ("/v1/models", 200, lambda c: c.get("/v1/models")),
             ("/v1/completions", 405, lambda c: c.get("/v1/completions")),
             ("/openapi.json", 200, lambda c: c.get("/openapi.json")),
             ("other", 404, lambda c: c.get("/v1/no-such-route/123"))]
    before = [_num_requests(server, route, status) for route, status, _ in calls]
    for route, status, call in calls:
        assert call(http).status_code == status, route
    deadline = time.monotonic() + 5  # the middleware counts once the response is sent, so it may lag a little
    while [_num_requests(server, route, status) for route, status, _ in calls] != [b + 1 for b in before]:
        assert time.monotonic() < deadline, [_num_requests(server, r, s) - b for (r, s, _), b in zip(calls, before)]
        time.sleep(0.01)
    routes = {s.labels["route"] for m in server.ctx.metrics.registry.collect() if m.name == "roofline_requests"
              for s in m.samples}
    templates = {r.path_format for r in create_app(server.ctx.engine, server.ctx.config).routes}
    assert routes <= templates | {"other"}
