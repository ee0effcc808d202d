"""The official `openai` Python client against a real `hypha up`."""
import concurrent.futures

import openai
import pytest

Q = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert models[0].object == "model"


def test_chat_completion(client, model):
    r = client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=24)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion"


def test_chat_streaming_matches_non_streaming(client, model):
    whole = client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(
        model=model, messages=Q, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, chunks = "", None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                text += c.delta.content
                chunks += 1
            if c.finish_reason:
                finish = c.finish_reason
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks >= 2, "the reply should arrive in several chunks"


def test_text_completion_and_stream(client, model):
    r = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True,
        )
        if c.choices
    )
    assert text == r.choices[0].text


def test_max_tokens_gives_length(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a long poem about the sea."}],
        temperature=0, max_tokens=7,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_stop_string(client, model):
    full = client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=24)
    content = full.choices[0].message.content
    assert "Paris" in content
    r = client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=24, stop=["Paris"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == content[: content.index("Paris")]
    assert "Paris" not in r.choices[0].message.content


def test_seed_reproducible(client, model):
    msgs = [{"role": "user", "content": "Tell me a story about a dragon."}]
    def sample(seed):
        return client.chat.completions.create(
            model=model, messages=msgs, temperature=1.0, seed=seed, max_tokens=24,
        ).choices[0].message.content
    a = sample(7)
    assert a == sample(7)
    assert any(sample(s) != a for s in (8, 9, 10))


def test_eight_concurrent_greedy_equal_alone(client, model):
    questions = [
        "What is the capital of France?", "Name three colours.", "What is 2 + 2?",
        "Write a haiku about rain.", "Who wrote Hamlet?", "What do bees make?",
        "Say hello in Spanish.", "What is the largest planet?",
    ]
    def ask(q):
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=32,
        ).choices[0].message.content
    alone = [ask(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone


def test_errors_are_openai_errors(client, model):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=Q)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=Q, temperature=9)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "word " * 2000}],
        )
    assert e.value.code == "context_length_exceeded"
    # The node still serves after the errors.
    r = client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=4)
    assert r.usage.completion_tokens == 4


def test_unhonoured_fields_are_refused_by_name(client, model):
    # Tools are served (test_tools_client.py); the deprecated functions are not.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=Q, max_tokens=4, functions=[{"name": "get_weather"}])
    assert e.value.code == "unsupported_parameter"
    assert e.value.param == "functions"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=Q, max_tokens=4, logit_bias={"50256": -100})
    assert e.value.param == "logit_bias"
    # Fields that change nothing are served.
    r = client.chat.completions.create(
        model=model, messages=Q, temperature=0, max_tokens=4, user="u-1", metadata={"run": "7"})
    assert r.usage.completion_tokens == 4


def test_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
