"""LangChain's OpenAI integration against hypha: `ChatOpenAI` with
`with_structured_output` (a strict JSON schema) and `bind_tools` (tool
calling), against the seeder's own API and a consumer's, and
`OpenAIEmbeddings` against the node that runs the model with
`--embeddings`."""
from typing import List

from pydantic import BaseModel, Field

MODEL = "SmolLM2-135M-Instruct.Q4_1"


class City(BaseModel):
    """A city and some of its sights."""
    name: str = Field(max_length=20)
    sights: List[str] = Field(max_length=3)


class GetWeather(BaseModel):
    """Get the current weather in a city."""
    city: str = Field(max_length=24)


def _chat(base):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key="unused", temperature=0,
                      max_tokens=120, max_retries=0, timeout=120)


def test_with_structured_output(base):
    city = _chat(base).with_structured_output(City).invoke("Describe Paris as JSON.")
    assert isinstance(city, City)
    assert len(city.name) <= 20 and len(city.sights) <= 3


def test_bind_tools(base):
    llm = _chat(base).bind_tools([GetWeather], tool_choice="GetWeather", parallel_tool_calls=False)
    msg = llm.invoke("What is the weather in Paris?")
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call["name"] == "GetWeather" and isinstance(call["args"]["city"], str)


def test_openai_embeddings(node):
    from langchain_openai import OpenAIEmbeddings
    common = dict(model=MODEL, base_url=node + "/v1", api_key="unused", max_retries=0)
    # Token ids by default: tiktoken would fetch its encoding from the
    # network, so texts go as text here, and as ids below.
    emb = OpenAIEmbeddings(check_embedding_ctx_length=False, **common)
    docs = emb.embed_documents(["The cat sat on the mat.", "A dog barks."])
    query = emb.embed_query("The cat sat on the mat.")
    assert len(docs) == 2 and len(query) == 576
    assert all(abs(a - b) < 1e-5 for a, b in zip(docs[0], query))
    # Token ids, as LangChain sends them when it counts tokens itself.
    ids = emb.client.create(model=MODEL, input=[[1, 2, 3], [4, 5]])
    assert len(ids.data) == 2


