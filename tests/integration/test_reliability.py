"""Bad input, input limits, truncation and API keys, through real HTTP."""

import json

import pytest

from tests.integration.conftest import configure_ingress, ingress_config

pytestmark = pytest.mark.integration

HUGE = "9" * 5000  # an integer longer than Python's JSON parser reads


def nested(depth: int) -> bytes:
    return b'{"input": ' + b"[" * depth + b'"x"' + b"]" * depth + b"}"


BAD_BODIES = [
    ("/v1/embeddings", b'{"input": ""}'),
    ("/v1/embeddings", b'{"input": []}'),
    ("/v1/embeddings", b'{"input": [1, 2]}'),
    ("/v1/embeddings", b'{"input": {"text": "x"}}'),
    ("/v1/embeddings", b'{"input": "x"'),  # truncated JSON
    ("/v1/embeddings", b'{"input": "\xff\xfe"}'),  # invalid UTF-8
    ("/v1/embeddings", b'{"input": "\\ud800"}'),  # a lone surrogate
    ("/v1/embeddings", b'{"input": "x", "dimensions": NaN}'),
    ("/v1/embeddings", b'{"input": "x", "dimensions": 1e999}'),
    ("/v1/embeddings", b'{"input": "x", "dimensions": ' + HUGE.encode() + b"}"),
    ("/v1/embeddings", nested(100_000)),
    ("/v1/embeddings", b"[]"),
    ("/v1/embeddings", b""),
    ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ""}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}'),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e30}',
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "seed": ' + HUGE[:40].encode() + b"}",
    ),
    ("/v1/rerank", b'{"query": "q", "documents": []}'),
    ("/v1/rerank", b'{"query": "", "documents": ["a"]}'),
    ("/v1/documents", b'{"collection": "ok", "documents": [{"text": "a\\u0000b"}]}'),
    (
        "/v1/documents",
        b'{"collection": "ok", "documents": [{"text": "t", "metadata": {"x": NaN}}]}',
    ),
    ("/v1/documents", b'{"collection": "bad name!", "documents": [{"text": "t"}]}'),
    ("/v1/search", b'{"collection": "ok", "query": "q", "filters": {"x": Infinity}}'),
    ("/v1/search", b'{"collection": "x; DROP TABLE chunks", "query": "q"}'),
    ("/v1/search", b'{"collection": "ok", "query": "q", "top_k": -1}'),
]


@pytest.mark.parametrize(
    ("path", "body"), BAD_BODIES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_bad_input_gets_a_4xx_json_error(client, path, body):
    answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500, answer.text[:300]
    error = answer.json()["error"]
    assert error["message"] and error["type"]


def test_bad_path_parameters_get_4xx(client):
    for path in ["/v1/documents/a%00b/doc", "/v1/documents/ok/do%00c", "/v1/collections/%00"]:
        answer = client.delete(path)
        assert answer.status_code == 400 and "error" in answer.json()


def test_sql_in_values_is_data(client):
    """Filters and ids reach PostgreSQL as parameters: SQL in them matches nothing, runs nothing."""
    sneaky = "x'); DROP TABLE chunks; --"
    stored = client.post(
        "/v1/documents",
        json={
            "collection": "sql-safety",
            "documents": [
                {"id": sneaky, "text": "A harmless sentence.", "metadata": {"k": sneaky}}
            ],
        },
    )
    assert stored.status_code == 200
    hits = client.post(
        "/v1/search",
        json={"collection": "sql-safety", "query": "harmless", "filters": {"k": sneaky}},
    ).json()["results"]
    assert [h["document_id"] for h in hits] == [sneaky]
    none = client.post(
        "/v1/search",
        json={"collection": "sql-safety", "query": "harmless", "filters": {"k": "' OR 1=1 --"}},
    ).json()["results"]
    assert none == []


def test_truncation_is_reported_in_usage(client, restore_ingress):
    # The chat below reads a whole 8,192-token context in fp32 on one thread: ~60 s alone,
    # past the test config's 120 s chat deadline when the machine is busy.
    configure_ingress(client, {"routes": {"chat": {"deadline_s": 600}}})
    long_text = "word " * 2000  # far past the embedder's 256 tokens
    usage = client.post("/v1/embeddings", json={"input": [long_text, "short"]}).json()["usage"]
    assert usage["truncated_inputs"] == 1
    assert usage["prompt_tokens"] <= 256 + 10
    rerank = client.post(
        "/v1/rerank", json={"query": "which word?", "documents": [long_text, "a short one"]}
    ).json()
    assert rerank["usage"]["truncated_documents"] == 1
    answer = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello " * 9000}], "max_tokens": 2},
        timeout=600,
    )
    assert answer.status_code == 200, answer.text
    chat = answer.json()
    assert chat["usage"]["truncated_prompt_tokens"] > 0
    assert chat["usage"]["prompt_tokens"] + 2 <= 8192


@pytest.fixture
def restore_ingress(client):
    yield
    configure_ingress(client, ingress_config())


def test_input_limits_change_live(client, restore_ingress):
    inputs = {"max_body_bytes": 4096, "max_inputs": 4, "max_input_chars": 50, "max_messages": 2}
    configure_ingress(client, {"inputs": inputs})
    assert client.post("/v1/embeddings", json={"input": ["a"] * 4}).status_code == 200
    many = client.post("/v1/embeddings", json={"input": ["a"] * 5})
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_inputs"
    long = client.post("/v1/embeddings", json={"input": ["a" * 51]})
    assert long.status_code == 400 and long.json()["error"]["param"] == "input.0"
    big = client.post("/v1/embeddings", json={"input": ["a" * 40] * 200})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    messages = [{"role": "user", "content": "x"}] * 3
    chat = client.post("/v1/chat/completions", json={"messages": messages})
    assert chat.status_code == 400


def test_api_keys_from_a_file(client, tmp_path, restore_ingress):
    keys = tmp_path / "api-keys"
    keys.write_text("# test keys\nkey-one\nkey-two\n")
    configure_ingress(client, {"auth": {"api_keys_file": str(keys)}}, key="key-one")
    body = {"input": "authenticated"}
    for headers in [{}, {"Authorization": "Bearer nope"}, {"Authorization": "key-one"}]:
        answer = client.post("/v1/embeddings", json=body, headers=headers)
        assert answer.status_code == 401, headers
        assert answer.json()["error"]["type"] == "authentication_error"
    for key in ["key-one", "key-two"]:
        answer = client.post(
            "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/ready").status_code == 200
    status = client.get("/v1/status", headers={"Authorization": "Bearer key-two"})
    assert status.json()["auth"] == {"keys": 2}
    assert "key-one" not in status.text and "key-one" not in json.dumps(status.json())
