"""Request validation and the error shape, without a cluster."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serve_app.config import InputLimits
from serve_app.protocol import errors
from serve_app.protocol.documents import IngestRequest, SearchRequest
from serve_app.protocol.limits import check_chat, check_embeddings, check_ingest, check_rerank
from serve_app.protocol.openai import ChatCompletionRequest, EmbeddingRequest
from serve_app.protocol.rerank import RerankRequest


def test_embedding_input_forms():
    assert EmbeddingRequest(input="a").texts == ["a"]
    assert EmbeddingRequest(input=["a", "b"]).texts == ["a", "b"]
    for bad in ([], "", [""], [1, 2], None):
        with pytest.raises(ValidationError):
            EmbeddingRequest(input=bad)
    with pytest.raises(ValidationError):
        EmbeddingRequest(input="a", encoding_format="int8")
    with pytest.raises(ValidationError):
        EmbeddingRequest(input="a", dimensions=0)


def test_chat_request_limits():
    messages = [{"role": "user", "content": "hi"}]
    request = ChatCompletionRequest(messages=messages, stop="END", max_completion_tokens=7)
    assert request.stops == ("END",)
    assert request.token_budget == 7
    parts = ChatCompletionRequest(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    )
    assert parts.messages[0].text() == "ab"
    for bad in (
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": messages, "n": 2},
        {"messages": messages, "temperature": 3},
        {"messages": messages, "max_tokens": 0},
        {"messages": messages, "stop": ["a", "b", "c", "d", "e"]},
        {"messages": messages, "stop": [""]},
        {"messages": messages, "presence_penalty": 2.5},
    ):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(**bad)


def test_rerank_documents_accept_strings_and_objects():
    request = RerankRequest(query="q", documents=["a", {"text": "b"}])
    assert request.texts == ["a", "b"]
    with pytest.raises(ValidationError):
        RerankRequest(query="q", documents=[])
    with pytest.raises(ValidationError):
        RerankRequest(query="", documents=["a"])


def test_document_requests():
    request = IngestRequest(collection="legal-cases_2024", documents=[{"text": "x"}, {"text": "y"}])
    first, second = (d.key for d in request.documents)
    assert first.startswith("sha256:") and first != second
    assert (
        IngestRequest(collection="c", documents=[{"id": "a", "text": "x"}]).documents[0].key == "a"
    )
    for bad in (
        {"collection": "has space", "documents": [{"text": "x"}]},
        {"collection": "", "documents": [{"text": "x"}]},
        {"collection": "c", "documents": [{"text": "x"}, {"text": "x"}]},  # same hash id
        {"collection": "c", "documents": [{"text": "x"}], "chunking": {"max_tokens": 8}},
    ):
        with pytest.raises(ValidationError):
            IngestRequest(**bad)
    assert SearchRequest(collection="c", query="q").top_k == 10
    with pytest.raises(ValidationError):
        SearchRequest(collection="c", query="q", rerank_top_n=0)


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    errors.install(app)

    @app.post("/echo")
    async def echo(request: EmbeddingRequest) -> dict:
        return {"n": len(request.texts)}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret detail")

    @app.get("/teapot")
    async def teapot() -> dict:
        raise errors.APIError(418, "short and stout", param="spout", code="teapot")

    return TestClient(app, raise_server_exceptions=False)


def assert_error_shape(response, status: int) -> dict:
    assert response.status_code == status
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["message"]
    return body


def test_errors_use_openai_shape(client):
    assert client.post("/echo", json={"input": ["x"]}).json() == {"n": 1}
    body = assert_error_shape(client.post("/echo", json={"input": []}), 400)
    assert body["param"] == "input"
    body = assert_error_shape(
        client.post("/echo", content=b"{bad", headers={"content-type": "application/json"}), 400
    )
    assert body["code"] == "invalid_json"
    assert assert_error_shape(client.post("/echo", json={"input": [1]}), 400)["param"] == "input"
    assert assert_error_shape(client.get("/nowhere"), 404)["type"] == "not_found_error"
    assert_error_shape(client.get("/echo"), 405)
    body = assert_error_shape(client.get("/boom"), 500)
    assert "secret detail" not in body["message"]
    assert assert_error_shape(client.get("/teapot"), 418)["param"] == "spout"


def test_text_that_no_tokenizer_or_database_takes_is_refused():
    surrogate = "half of a pair \ud800"
    for build in [
        lambda: EmbeddingRequest(input=surrogate),
        lambda: RerankRequest(query="q", documents=[surrogate]),
        lambda: ChatCompletionRequest(messages=[{"role": "user", "content": surrogate}]),
        lambda: IngestRequest(collection="c", documents=[{"text": "nul \x00 inside"}]),
        lambda: IngestRequest(collection="c", documents=[{"id": "a\x00", "text": "t"}]),
    ]:
        with pytest.raises(ValidationError):
            build()


@pytest.mark.parametrize(
    "metadata",
    [{"x": float("nan")}, {"x": [float("inf")]}, {"x": "\x00"}, {"\ud800": 1}],
)
def test_metadata_and_filters_must_be_storable_json(metadata):
    with pytest.raises(ValidationError):
        IngestRequest(collection="c", documents=[{"text": "t", "metadata": metadata}])
    with pytest.raises(ValidationError):
        SearchRequest(collection="c", query="q", filters=metadata)


def test_json_nesting_is_bounded():
    deep: dict = {"leaf": 1}
    for _ in range(40):
        deep = {"k": deep}
    with pytest.raises(ValidationError, match="nested deeper"):
        SearchRequest(collection="c", query="q", filters=deep)
    shallow = {"a": {"b": [1, 2.5, "x", None, True]}}
    assert SearchRequest(collection="c", query="q", filters=shallow).filters == shallow


def test_messages_need_content_except_assistant_turns():
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    assert len(ChatCompletionRequest(messages=ok).messages) == 2
    for message in [
        {"role": "user", "content": ""},
        {"role": "system"},
        {"role": "user", "content": [{"type": "text", "text": ""}]},
        {"role": "narrator", "content": "x"},
    ]:
        with pytest.raises(ValidationError):
            ChatCompletionRequest(messages=[message])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], seed=2**64)


def test_input_limits_answer_400_naming_the_field():
    limits = InputLimits(max_inputs=3, max_input_chars=10, max_documents=2, max_messages=2)
    assert InputLimits().max_inputs == 2048  # OpenAI's own limit, by default
    check_embeddings(EmbeddingRequest(input=["a", "b", "c"]), limits)
    cases = [
        (check_embeddings, EmbeddingRequest(input=["a"] * 4), "input", "too_many_inputs"),
        (check_embeddings, EmbeddingRequest(input=["a", "b" * 11]), "input.1", "input_too_long"),
        (check_rerank, RerankRequest(query="q", documents=["a"] * 3), "documents", None),
        (check_rerank, RerankRequest(query="q" * 11, documents=["a"]), "query.0", None),
        (
            check_chat,
            ChatCompletionRequest(messages=[{"role": "user", "content": "x"}] * 3),
            "messages",
            None,
        ),
        (
            check_ingest,
            IngestRequest(collection="c", documents=[{"text": f"t{i}"} for i in range(3)]),
            "documents",
            "too_many_inputs",
        ),
    ]
    for check, request, param, code in cases:
        with pytest.raises(errors.APIError) as caught:
            check(request, limits)
        assert caught.value.status == 400
        assert param is None or caught.value.body.param == param
        assert code is None or caught.value.body.code == code
