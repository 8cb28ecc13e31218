"""The official openai client against the real server: the compatibility test that counts."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture
def client(mode_url: str) -> openai.OpenAI:
    """In-process and managed mode alike."""
    return openai.OpenAI(base_url=mode_url + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "gemma-3-270m-q4_k_m" in ids


def test_chat_non_stream(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="default", messages=[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hello"}], max_tokens=8)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content
    assert out.usage is not None and out.usage.completion_tokens <= 8


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8 or chunks[-2].choices[0].finish_reason == "stop"


def test_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model="default", prompt="1, 2, 3,", max_tokens=4,
                                    temperature=0)
    assert out.choices[0].text
    assert out.usage is not None and out.usage.completion_tokens == 4


def test_embeddings(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model="default", input=["one", "two"])
    assert [len(d.embedding) for d in out.data] == [640, 640]
    # The client asks for base64 by default when numpy is present; both decode to floats.
    out = client.embeddings.create(model="default", input="one", encoding_format="float")
    assert len(out.data[0].embedding) == 640


def test_errors_map_to_client_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="default", messages=[])
    assert bad.value.param == "messages"
