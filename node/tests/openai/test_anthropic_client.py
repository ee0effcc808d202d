"""The official `anthropic` Python client against a real `hypha up`: the
seeder's own API and a consumer's, which routes to the seeder."""
import anthropic
import pytest

MODEL = "SmolLM2-135M-Instruct.Q4_1"
Q = [{"role": "user", "content": "What is the capital of France?"}]
# The SDK no longer takes sampling settings as arguments; the node still
# reads them from the body.
GREEDY = {"temperature": 0}


def _client(base):
    return anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=120)


def test_message(base):
    r = _client(base).messages.create(
        model=MODEL, max_tokens=24, messages=Q, system="Answer in one sentence.", extra_body=GREEDY,
    )
    assert r.type == "message" and r.role == "assistant"
    assert r.content[0].type == "text"
    assert "Paris" in r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens")
    assert r.usage.input_tokens > 5
    assert 1 <= r.usage.output_tokens <= 24


def test_stream_matches_whole_message(base):
    c = _client(base)
    whole = c.messages.create(model=MODEL, max_tokens=16, messages=Q, extra_body=GREEDY)
    with c.messages.stream(model=MODEL, max_tokens=16, messages=Q, extra_body=GREEDY) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert len(pieces) >= 2, "the reply should arrive in several deltas"
    assert "".join(pieces) == whole.content[0].text
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_stop_sequence_is_named(base):
    c = _client(base)
    r = c.messages.create(model=MODEL, max_tokens=24, messages=Q, extra_body=GREEDY,
                          stop_sequences=["Paris"])
    assert r.stop_reason == "stop_sequence"
    assert r.stop_sequence == "Paris"
    assert "Paris" not in r.content[0].text


TOOLS = [{"name": "get_weather", "description": "Get the current weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                           "required": ["city"]}}]


def _check_tool_use(block):
    assert block.type == "tool_use" and block.name == "get_weather" and block.id
    assert isinstance(block.input, dict) and isinstance(block.input["city"], str)


def test_tool_use(base):
    r = _client(base).messages.create(
        model=MODEL, max_tokens=96, messages=Q, extra_body=GREEDY, tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert r.stop_reason == "tool_use"
    uses = [b for b in r.content if b.type == "tool_use"]
    assert len(uses) == 1
    _check_tool_use(uses[0])
    # The call and its result in the history: the model answers in text.
    follow = Q + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                      "content": "21 degrees and sunny"}]},
    ]
    r = _client(base).messages.create(
        model=MODEL, max_tokens=24, messages=follow, extra_body=GREEDY, tools=TOOLS,
        tool_choice={"type": "none"},
    )
    assert r.stop_reason in ("end_turn", "max_tokens")
    assert r.content[0].type == "text" and r.content[0].text


def test_tool_use_streams(base):
    with _client(base).messages.stream(
        model=MODEL, max_tokens=96, messages=Q, extra_body=GREEDY, tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds, kinds
    assert final.stop_reason == "tool_use"
    uses = [b for b in final.content if b.type == "tool_use"]
    assert uses
    for u in uses:
        _check_tool_use(u)


def test_server_tools_are_refused_by_name(base):
    with pytest.raises(anthropic.BadRequestError) as e:
        _client(base).messages.create(
            model=MODEL, max_tokens=8, messages=Q,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert "`tools`" in str(e.value)
    assert e.value.body["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_not_found(base):
    with pytest.raises(anthropic.NotFoundError):
        _client(base).messages.create(model="no-such-model", max_tokens=8, messages=Q)
