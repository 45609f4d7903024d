"""Every route over real HTTP against the real models."""

import base64

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_health_ready_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["models"]["embedder"] == "all-MiniLM-L6-v2"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["all-MiniLM-L6-v2", "query-likelihood-smollm2-135m", "SmolLM2-135M-Instruct"]


def test_status_reports_model_precision_device_memory(client):
    status = client.get("/v1/status").json()
    for role in ("embedder", "reranker", "generator", "rag_generator"):
        info = status["models"][role]
        assert info["precision"] == "fp32"
        assert info["device"] == "cpu"
        assert info["memory"]["model_bytes"] > 10_000_000
        assert info["memory"]["process_rss_bytes"] > info["memory"]["model_bytes"]


def embed(client, **body) -> dict:
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_embeddings_are_normalized_and_ordered(client):
    texts = ["The cat sat on the mat.", "A feline rested on a rug.", "Stock markets fell today."]
    body = embed(client, input=texts)
    assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Paraphrases are closer to each other than to an unrelated sentence.
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3 * 3


def test_embeddings_base64_and_dimensions(client):
    plain = np.array(embed(client, input="hello world")["data"][0]["embedding"])
    encoded = embed(client, input="hello world", encoding_format="base64")["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_allclose(decoded, plain, atol=1e-6)
    short = np.array(embed(client, input="hello world", dimensions=64)["data"][0]["embedding"])
    assert short.shape == (64,)
    assert abs(np.linalg.norm(short) - 1) < 1e-5
    np.testing.assert_allclose(short, plain[:64] / np.linalg.norm(plain[:64]), atol=1e-5)


def test_large_request_is_split_across_batches(client):
    texts = [f"sentence number {i}" for i in range(40)]  # > max_batch_size 16
    body = embed(client, input=texts)
    vectors = np.array([d["embedding"] for d in body["data"]])
    single = np.array(embed(client, input=texts[33])["data"][0]["embedding"])
    np.testing.assert_allclose(vectors[33], single, atol=1e-4)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/embeddings", {"input": []}, 400, "input"),
        ("/v1/embeddings", {"input": ""}, 400, "input"),
        ("/v1/embeddings", {"input": "x", "dimensions": 1000}, 400, "dimensions"),
        ("/v1/embeddings", {"input": "x", "model": "gpt-9"}, 404, "model"),
        ("/v1/rerank", {"query": "q", "documents": []}, 400, "documents"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "n": 3},
            400,
            "n",
        ),
    ],
)
def test_bad_requests_get_4xx_json(client, path, body, status, param):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] and error["message"]


def test_invalid_json_is_a_400(client):
    response = client.post(
        "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_rerank_orders_by_relevance(client):
    documents = [
        "Bananas are rich in potassium and grow in tropical climates.",
        {"text": "Paris is the capital and largest city of France."},
        "The stock exchange closed lower on Friday.",
    ]
    for path in ("/v1/rerank", "/rerank"):
        response = client.post(
            path,
            json={
                "query": "What is the capital of France?",
                "documents": documents,
                "top_n": 2,
                "return_documents": True,
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        results = body["results"]
        assert len(results) == 2
        assert results[0]["index"] == 1
        assert results[0]["document"]["text"].startswith("Paris")
        assert results[0]["relevance_score"] >= results[1]["relevance_score"]
        assert body["usage"]["total_tokens"] > 0
    body = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]}).json()
    assert all("document" not in r or r["document"] is None for r in body["results"])


def chat(client, **body) -> dict:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_completion_shape_and_usage(client):
    body = chat(
        client,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
    )
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 32


def test_chat_max_tokens_and_stop(client):
    messages = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    limited = chat(client, messages=messages, max_tokens=5)
    assert limited["choices"][0]["finish_reason"] == "length"
    assert limited["usage"]["completion_tokens"] == 5
    full = chat(client, messages=messages, max_tokens=60)["choices"][0]["message"]["content"]
    assert "5" in full
    stopped = chat(client, messages=messages, max_tokens=60, stop=["5"])["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == full[: full.index("5")]


def test_chat_sampling_with_seed_is_reproducible(client):
    request = {
        "messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
        "max_tokens": 16,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 1234,
    }
    first = chat(client, **request)["choices"][0]["message"]["content"]
    assert chat(client, **request)["choices"][0]["message"]["content"] == first


def test_chat_frequency_penalty_discourages_repeats(client):
    messages = [{"role": "user", "content": "Write the word hello twenty times."}]
    plain = chat(client, messages=messages, max_tokens=30)["choices"][0]["message"]["content"]
    penalized = chat(client, messages=messages, max_tokens=30, frequency_penalty=2.0)
    text = penalized["choices"][0]["message"]["content"]
    assert plain.lower().count("hello") > text.lower().count("hello")
