"""Tool calling through the `openai` Python client: `tool_choice`
`required`, a named function and `auto`, the SDK's stream assembly and its
`parse` helper with a strict pydantic tool, against the seeder's own API and
a consumer's, which routes to the seeder."""
import json

import openai
from pydantic import BaseModel, Field

MODEL = "SmolLM2-135M-Instruct.Q4_1"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }},
    {"type": "function", "function": {
        "name": "get_time",
        "description": "Get the current time",
        "parameters": {"type": "object", "properties": {}},
    }},
]


class GetWeather(BaseModel):
    """Get the current weather in a city."""
    city: str = Field(max_length=24)


def _client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _check(call):
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(args) == {"city"} and isinstance(args["city"], str)
    else:
        assert call.function.name == "get_time", call.function.name
    return call.function.name


def test_required_gives_calls(base):
    r = _client(base).chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
        temperature=0, max_tokens=96,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check(call)


def test_named_function_is_the_one_called(base):
    r = _client(base).chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=96,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and _check(calls[0]) == "get_time"


def test_stream_helper_assembles_calls(base):
    with _client(base).chat.completions.stream(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
        temperature=0, max_tokens=96,
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events, events
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        _check(call)


def test_auto_answers_or_calls(base):
    r = _client(base).chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=96,
    )
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            _check(call)
    else:
        assert choice.message.content and not choice.message.content.lstrip().startswith("{")


def test_parse_gives_typed_arguments(base):
    r = _client(base).chat.completions.parse(
        model=MODEL, messages=ASK, temperature=0, max_tokens=96,
        tools=[openai.pydantic_function_tool(GetWeather)], tool_choice="required",
        parallel_tool_calls=False,
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_a_tool_result_in_the_history_is_answered(base):
    client = _client(base)
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
        temperature=0, max_tokens=96, parallel_tool_calls=False,
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
        temperature=0, max_tokens=24,
    )
    assert r.choices[0].message.content
    assert not r.choices[0].message.tool_calls
