"""Embeddings through the `openai` Python client (which asks for base64 by
default), against a node that runs the model with `--embeddings`; a
consumer answers that embeddings do not cross the network yet."""
import math

import openai
import pytest

MODEL = "SmolLM2-135M-Instruct.Q4_1"


def _client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _unit(v):
    return abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-3


def test_embeddings_create(node):
    c = _client(node)
    r = c.embeddings.create(model=MODEL, input=["The cat sat on the mat.", "A dog barks."])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == 576 and _unit(d.embedding) for d in r.data)
    assert r.usage.prompt_tokens > 0
    floats = c.embeddings.create(model=MODEL, input="The cat sat on the mat.",
                                 encoding_format="float")
    assert all(abs(a - b) < 1e-5 for a, b in zip(floats.data[0].embedding, r.data[0].embedding))
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model=MODEL, input="x", dimensions=64)
    assert e.value.param == "dimensions"


def test_a_consumer_says_embeddings_stay_local(consumer):
    with pytest.raises(openai.NotFoundError) as e:
        _client(consumer).embeddings.create(model=MODEL, input="x")
    assert "peers" in str(e.value)
