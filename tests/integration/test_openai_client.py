"""The official `openai` client works unchanged against the service."""

import numpy as np
import pytest
from openai import OpenAI

pytestmark = pytest.mark.integration


@pytest.fixture
def openai_client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_openai_embeddings(openai_client):
    # The client asks for base64 by default and decodes it itself.
    result = openai_client.embeddings.create(
        model="all-MiniLM-L6-v2", input=["first text", "second text"]
    )
    assert [d.index for d in result.data] == [0, 1]
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert result.usage.prompt_tokens > 0


def test_openai_models(openai_client):
    assert "SmolLM2-135M-Instruct" in {m.id for m in openai_client.models.list()}


def test_openai_streaming_chat(openai_client):
    stream = openai_client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert "Paris" in content
    assert finishes in (["stop"], ["length"])
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2  # really streamed
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0

    whole = openai_client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
    )
    assert whole.choices[0].message.content == content  # greedy: streaming changes nothing


def test_openai_errors_are_raised_as_api_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[])
