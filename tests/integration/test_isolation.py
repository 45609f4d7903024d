"""No client can break another's work: a hostile sampling setting fails no one, and a large
ingest does not hold up live queries."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from tests.integration.test_batching import run_concurrently
from tests.integration.test_documents import ingest

pytestmark = pytest.mark.integration


def chat(content: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 12, **extra}


def test_a_hostile_temperature_fails_no_one(server, client):
    prompts = ["Name a planet.", "What is 2 + 2?", "Say hello in French.", "Name a colour."]
    hostile = chat("Name a planet.", temperature=1e-45, seed=3)
    bodies = [chat(p) for p in prompts] + [hostile, chat("Name a river.", temperature=5e-324)]
    responses = run_concurrently(server, "/v1/chat/completions", bodies)
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    texts = [r.json()["choices"][0]["message"]["content"] for r in responses]
    # A temperature too small to compute with is greedy: the same answer as temperature 0.
    assert texts[4] == texts[0]
    # Streamed, beside a normal stream, it ends with a finish chunk, not an error event.
    streamed = run_concurrently(
        server,
        "/v1/chat/completions",
        [{**hostile, "stream": True}, {**chat("Name a colour."), "stream": True}],
    )
    for r in streamed:
        assert r.status_code == 200 and '"error"' not in r.text and '"finish_reason"' in r.text


def test_a_query_is_answered_quickly_while_a_large_ingest_runs(server, client):
    ingest(client, "live", [{"id": "seed", "text": "Lighthouses guide ships past rocks."}])
    # Warm both query paths first: what is measured is the ingest's effect, not a cold start.
    client.post("/v1/search", json={"collection": "live", "query": "warm"}).raise_for_status()
    client.post("/v1/embeddings", json={"input": "warm"}).raise_for_status()
    paragraph = (
        "Document {n} describes the harbour: its lighthouse, the ships that pass it at night, "
        "the tides that rise twice a day and the keepers who tended the lamp for a century. "
    )
    documents = [{"id": f"bulk-{n}", "text": paragraph.format(n=n) * 8} for n in range(300)]
    done: dict[str, float | int] = {}

    def bulk() -> None:
        with httpx.Client(base_url=server, timeout=300) as c:
            answer = c.post("/v1/documents", json={"collection": "bulk", "documents": documents})
            done["status"], done["at"] = answer.status_code, time.monotonic()

    thread = threading.Thread(target=bulk)
    thread.start()
    time.sleep(2.0)  # the ingest's pieces are queued at the embedder by now
    latencies = []
    for i in range(6):
        start = time.monotonic()
        answer = client.post("/v1/search", json={"collection": "live", "query": f"ships {i}"})
        assert answer.status_code == 200, answer.text
        latencies.append(time.monotonic() - start)
        start = time.monotonic()
        answer = client.post("/v1/embeddings", json={"input": f"a live query {i}"})
        assert answer.status_code == 200, answer.text
        latencies.append(time.monotonic() - start)
        time.sleep(0.2)
    asked_until = time.monotonic()
    thread.join()
    client.delete("/v1/collections/bulk")
    client.delete("/v1/collections/live")
    assert done["status"] == 200
    assert done["at"] > asked_until, "the ingest ended before the queries: nothing was shown"
    assert statistics.median(latencies) < 0.5 and max(latencies) < 1.0, latencies


def test_a_text_cut_to_what_the_reranker_reads_tokenizes_the_same():
    """The reranker cuts a query or passage to (tokens it reads + 1) * max_token_chars before
    tokenizing: on the bundled tokenizer, the tokens it reads are unchanged by the cut."""
    from deployments.engines import loading
    from serve_app.config import AppConfig, RerankerConfig

    config = RerankerConfig()
    tokenizer = loading.load_tokenizer(config, AppConfig().model_cache_dir)
    chars = loading.max_token_chars(tokenizer)
    texts = [
        "Which lighthouse guides the ships past the rocks at night? " * 400,
        " " * 30000 + "after a long run of spaces",
        "supercalifragilistic" * 700,
        "数字と文字 ✓ émigré " * 900,
        "\n\t  ".join(str(n) for n in range(6000)),
    ]
    for limit in (config.max_query_tokens, config.max_passage_tokens):
        for text in texts:
            whole = tokenizer.encode(text, add_special_tokens=False)
            cut = tokenizer.encode(text[: (limit + 1) * chars], add_special_tokens=False)
            assert len(whole) > limit and cut[:limit] == whole[:limit]
