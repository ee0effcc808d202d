"""The `openai` Python client's Responses API against a real `hypha up`:
the seeder's own API and a consumer's, which routes to the seeder."""
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct.Q4_1"
Q = "What is the capital of France?"


def _client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_response(base):
    r = _client(base).responses.create(
        model=MODEL, input=Q, instructions="Answer in one sentence.", temperature=0,
        max_output_tokens=64, store=False,
    )
    assert r.object == "response"
    assert r.status == "completed"
    assert "Paris" in r.output_text
    assert r.usage.input_tokens > 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_stream_helper_matches_whole_response(base):
    c = _client(base)
    args = dict(model=MODEL, input=[{"role": "user", "content": Q}], temperature=0,
                max_output_tokens=64)
    whole = c.responses.create(**args)
    with c.responses.stream(**args) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert len(deltas) >= 2, "the reply should arrive in several deltas"
    assert "".join(deltas) == whole.output_text
    assert final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_raw_stream_events(base):
    events = list(_client(base).responses.create(model=MODEL, input=Q, max_output_tokens=3,
                                                 temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_stateful_and_server_tool_requests_are_refused_by_name(base):
    c = _client(base)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input=Q, previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input=Q, tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools"


WEATHER = [{"type": "function", "name": "get_weather", "description": "Get the weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                           "required": ["city"], "additionalProperties": False},
            "strict": True}]
ASK = "What is the weather in Paris?"


def _check_call(item):
    import json
    assert item.type == "function_call" and item.name == "get_weather" and item.call_id
    assert isinstance(json.loads(item.arguments)["city"], str)


def test_function_calls(base):
    c = _client(base)
    r = c.responses.create(model=MODEL, input=ASK, tools=WEATHER, tool_choice="required",
                           parallel_tool_calls=False, temperature=0, max_output_tokens=96)
    assert r.status == "completed"
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1
    _check_call(calls[0])
    # The call and its output handed back: the model answers in text.
    follow = c.responses.create(
        model=MODEL, tools=WEATHER, tool_choice="none", temperature=0, max_output_tokens=24,
        input=[{"role": "user", "content": ASK}, calls[0].model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "21 degrees and sunny"}],
    )
    assert follow.output_text


def test_function_calls_stream(base):
    with _client(base).responses.stream(
        model=MODEL, input=ASK, tools=WEATHER, temperature=0, max_output_tokens=96,
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
    ) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in types, types
    assert "response.function_call_arguments.done" in types, types
    assert types[-1] == "response.completed"
    calls = [o for o in final.output if o.type == "function_call"]
    assert calls
    for call in calls:
        _check_call(call)
