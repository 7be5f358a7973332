"""Tool calling: parsing the model's calls (Hermes/Qwen and Llama 3.x formats), rendering tools and tool
results into the prompt, held-back streaming, and the HTTP routes on the default model (its template takes
no tools: they go into the system message), with forced calls that always parse against their schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from roofline.loaders.tokenizer import TextTokenizer, TokenizerInfo
from roofline.server.protocol import ChatMessage
from roofline.openai.tools import ToolCallStream, parse_tool_calls, render_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                   "required": ["zone"]}}}
NAMES = {"get_weather", "get_time"}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (('Let me check.\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>\n'
      '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'),
     "Let me check.", [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Oslo"})]),
    ('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}', None, [("get_time", {"zone": "UTC"})]),  # cut tag
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),  # Llama
    ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}; {"name": "get_weather", "parameters": {}}',
     None, [("get_time", {"zone": "CET"}), ("get_weather", {})]),
    ('{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}', None, [("get_time", {"zone": "UTC"})]),
    ('{"name": "launch_rockets", "arguments": {}}', '{"name": "launch_rockets", "arguments": {}}', []),  # no such tool
    ('<tool_call>{"name": "get_time", "arguments": {</tool_call>',
     '<tool_call>{"name": "get_time", "arguments": {</tool_call>', []),  # does not parse
    ("It is sunny.", "It is sunny.", []),
])
def test_parse_tool_calls(text, content, calls):
    got_content, got_calls = parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


def _history() -> list[ChatMessage]:
    return [ChatMessage(role="system", content="Be brief."), ChatMessage(**ASK[0]),
            ChatMessage(role="assistant", content=None, tool_calls=[
                {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
            ChatMessage(role="tool", tool_call_id="call_1", content='{"temp": 21}')]


def test_tools_go_into_the_system_message_of_a_template_without_tools():
    messages = _history()
    out = render_messages(messages, ["Be brief.", ASK[0]["content"], "", '{"temp": 21}'],
                          type("Plan", (), {"tools": [WEATHER]})(), takes_tools=False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in out[0]["content"]
    assert json.loads(out[2]["content"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")) == \
        {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[3]["content"] == '<tool_response>\n{"temp": 21}\n</tool_response>'


def test_a_template_that_takes_tools_renders_them_itself():
    from tokenizers import Tokenizer, models

    template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{{ '\\n' }}{% endif %}"
                "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]"
                "{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}{{ '\\n' }}{% endfor %}")
    tok = TextTokenizer(Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                        TokenizerInfo(chat_template=template))
    assert tok.template_takes_tools
    texts = ["Be brief.", ASK[0]["content"], "", '{"temp": 21}']
    conversation = render_messages(_history(), texts, None, takes_tools=True)
    text = tok.apply_chat_template(conversation, add_generation_prompt=False, tools=[WEATHER, TIME])
    assert text.splitlines() == ["TOOLS:get_weather;get_time;", "system:Be brief.",
                                 "user:What is the weather in Paris?",
                                 'assistant:[call get_weather {"city": "Paris"}]', 'tool:{"temp": 21}(call_1)']


def test_streaming_holds_back_what_may_be_a_call():
    def stream(text: str) -> str:
        s, sent = ToolCallStream(), ""
        for k in range(1, len(text) + 1):
            sent += s.content_delta(text[:k])
        content, _ = parse_tool_calls(text, NAMES)
        return sent + s.rest(content, text)

    assert stream("It is sunny <b>today</b>.") == "It is sunny <b>today</b>."
    call = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    assert stream(call) == ""
    assert stream("One moment. " + call).strip() == "One moment."
    assert stream('{"a": 1}') == '{"a": 1}'  # JSON that is no call is content, sent at the end


def _call_args(call: dict, tool: dict) -> dict:
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_a_named_tool_choice_always_calls_it_with_valid_arguments(http):
    body = http.post("/v1/chat/completions", json={
        "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 60, "temperature": 0,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    _call_args(call, WEATHER)


def test_required_calls_one_of_the_tools_in_every_sample(http):
    body = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "What time is it in Tokyo?"}], "tools": [WEATHER, TIME],
        "tool_choice": "required", "max_tokens": 60, "n": 2, "temperature": 1.0, "seed": 3}).json()
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        _call_args(call, {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]])


def test_streamed_tool_calls_come_in_openais_shape(http):
    deltas, finishes = [], []
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 60, "temperature": 0,
            "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    deltas.append(choice["delta"])
                    finishes.append(choice["finish_reason"])
    parts = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert not any(d.get("content") for d in deltas)  # the call is not also sent as text
    assert parts[0]["id"].startswith("call_") and parts[0]["function"]["name"] == "get_weather"
    assert all(p["index"] == 0 for p in parts)
    args = "".join(p["function"].get("arguments", "") for p in parts)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    assert [f for f in finishes if f] == ["tool_calls"]


def test_openai_client_named_tool_call_and_tool_results_in_history(oai):
    first = oai.chat.completions.create(model="default", messages=ASK, tools=[WEATHER], max_tokens=60,
                                        temperature=0, tool_choice={"type": "function",
                                                                    "function": {"name": "get_weather"}})
    message = first.choices[0].message
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"
    follow = oai.chat.completions.create(model="default", max_tokens=20, temperature=0, tools=[WEATHER], messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_and_none(http):
    for choice in ("auto", "none"):
        body = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": choice,
                                                       "max_tokens": 40, "temperature": 0}).json()
        out = body["choices"][0]
        if choice == "none":
            assert "tool_calls" not in out["message"] and out["finish_reason"] in ("stop", "length")
        elif out["finish_reason"] == "tool_calls":  # the model chose to call: it parsed, so it names the tool
            assert out["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        else:
            assert isinstance(out["message"]["content"], str)


BAD = [
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[json.dumps(f)[:60] for f, _ in BAD])
def test_bad_tools_are_400(http, fields, param):
    resp = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, **fields})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param and "\n" not in resp.json()["error"]["message"]


def test_parallel_tool_calls_false_keeps_the_first_call():
    from roofline.server.protocol import ChatCompletionRequest
    from roofline.openai.tools import plan_tools

    text = ('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    for parallel, num_calls in ((None, 2), (True, 2), (False, 1)):
        plan = plan_tools(ChatCompletionRequest(messages=ASK, tools=[WEATHER, TIME], parallel_tool_calls=parallel))
        assert plan.choice == "auto" and plan.structured is None
        assert len(plan.parse(text)[1]) == num_calls


def test_forced_call_without_the_grammar_engine_is_a_400(http, monkeypatch):
    from roofline.openai import tools

    monkeypatch.setattr(tools, "grammar_available", lambda: False)
    resp = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "required",
                                                   "max_tokens": 5})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "grammar_engine_missing"
    # auto needs no grammar: the output is only parsed
    resp = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 3})
    assert resp.status_code == 200
