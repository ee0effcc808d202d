"""Structured output through the `openai` Python client's parse helpers
(pydantic models turned into strict JSON schemas), against the seeder's
own API and a consumer's, which routes to the seeder."""
from enum import Enum
from typing import List, Optional

import openai
import pytest
from pydantic import BaseModel, Field

MODEL = "SmolLM2-135M-Instruct.Q4_1"


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    colour: Colour
    friends: List[str] = Field(max_length=3)
    nickname: Optional[str] = Field(max_length=8)


def _client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_parse_gives_the_model(base):
    r = _client(base).chat.completions.parse(
        model=MODEL, temperature=0, max_tokens=300, response_format=Pet,
        messages=[{"role": "user", "content": "Describe a pet as JSON."}],
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    pet = choice.message.parsed
    assert isinstance(pet, Pet), choice.message.content
    assert 0 <= pet.age <= 30 and len(pet.name) <= 12 and len(pet.friends) <= 3


def test_responses_parse_gives_the_model(base):
    r = _client(base).responses.parse(
        model=MODEL, temperature=0, max_output_tokens=300, text_format=Pet,
        input="Describe a pet as JSON.",
    )
    assert r.status == "completed"
    assert isinstance(r.output_parsed, Pet), r.output_text


def test_json_object_streams_an_object(base):
    import json
    stream = _client(base).chat.completions.create(
        model=MODEL, temperature=0, max_tokens=300, stream=True,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give a cat's name and age as JSON."}],
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict), text


def test_a_schema_the_node_would_not_enforce_is_refused(base):
    with pytest.raises(openai.BadRequestError) as e:
        _client(base).chat.completions.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "string", "pattern": "^[a-z]+$"}}},
        )
    assert e.value.param == "response_format"
    assert e.value.code == "unsupported_schema"
    assert "`pattern`" in str(e.value)
