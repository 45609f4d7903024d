"""Precision modes, the embedding cache and token-bounded batches, on the real bundled models
in process (no Ray); the response cache over HTTP."""

import asyncio
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest

from deployments.embedder import Embedder
from deployments.engines.precision import UnsupportedPrecision
from serve_app.config import CacheConfig, EmbedderConfig
from tests.conftest import replica_loop
from tests.integration.conftest import TEST_CONFIG, redeploy
from tests.integration.test_documents import ingest, search

pytestmark = pytest.mark.integration

SENTENCES = [
    "The bridge was closed for repairs after the storm.",
    "A compiler translates source code into machine code.",
    "Rain is expected in the north for most of the week.",
    "She plays the cello in the city orchestra.",
]


@pytest.fixture(scope="module")
def run():
    """Run coroutines on one event loop for the whole module, as in a replica (`@serve.batch`
    keeps one queue per method, per process)."""
    with replica_loop(128) as run:
        yield run


def embedder(tmp_path, precision: str, caches: CacheConfig | None = None, **batching) -> Embedder:
    replica = Embedder.func_or_class(
        EmbedderConfig(precision=precision, threads=1), tmp_path, caches or CacheConfig()
    )
    replica.apply_batching({**EmbedderConfig().batching.model_dump(), **batching})
    return replica


def test_auto_measures_once_and_keeps_embeddings_close_to_fp32(tmp_path):
    auto = embedder(tmp_path, "auto")
    info = auto.model_info()
    trials = {t["precision"]: t for t in info["precision_trials"]}
    assert info["precision_measured"] and set(trials) == {"fp32", "bf16", "int8"}
    chosen = trials[info["precision"]]
    assert chosen["passed"] and chosen["agreement"] >= 0.99
    # The fastest passing candidate, and never slower than fp32.
    passing = [t for t in trials.values() if t["passed"]]
    assert chosen["seconds"] == min(t["seconds"] for t in passing)
    again = embedder(tmp_path, "auto")  # a restart on the same machine reads the choice
    assert not again.model_info()["precision_measured"]
    assert again.precision == auto.precision

    fp32 = embedder(tmp_path, "fp32")
    a, b = auto._encode(SENTENCES), fp32._encode(SENTENCES)
    assert np.mean(np.sum(a * b, axis=1)) >= 0.99


def test_int8_weights_are_smaller_and_bnb_fails_clearly_on_cpu(tmp_path):
    fp32 = embedder(tmp_path, "fp32").memory()["model_bytes"]
    int8 = embedder(tmp_path, "int8")
    assert int8.model_info()["precision"] == "int8"
    assert int8.memory()["model_bytes"] < 0.7 * fp32
    with pytest.raises(UnsupportedPrecision, match="needs a CUDA GPU"):
        embedder(tmp_path, "bnb-nf4")


def test_repeated_texts_come_from_the_embedding_cache(tmp_path, run):
    replica = embedder(tmp_path, "fp32")

    async def twice():
        first = await replica.embed(SENTENCES)
        batches = replica.stats.snapshot()["batches"]
        second = await replica.embed([SENTENCES[2], "A sentence not seen before.", SENTENCES[0]])
        return first, second, replica.stats.snapshot()["batches"] - batches

    first, second, new_batches = run(twice())
    assert np.array_equal(second.vectors[0], first.vectors[2])
    assert np.array_equal(second.vectors[2], first.vectors[0])
    assert second.tokens[0] == first.tokens[2]
    assert new_batches == 1  # only the unseen sentence went to the model
    cache = replica.model_info()["cache"]
    assert cache["hits"] == 2 and cache["misses"] == len(SENTENCES) + 1


def test_a_batch_is_bounded_in_tokens_as_well_as_items(tmp_path, run):
    replica = embedder(tmp_path, "fp32", max_batch_size=64, max_batch_tokens=512)
    long_text = "word " * 400  # truncated to the model's 256 tokens
    short = [f"short sentence {i}" for i in range(40)]

    async def together():
        return await asyncio.gather(replica.embed([long_text] * 6), replica.embed(short))

    long_result, short_result = run(together())
    assert long_result.truncated == 6 and max(long_result.tokens) == 256
    assert len(short_result.vectors) == 40
    stats = replica.stats.snapshot()
    assert stats["max_tokens"] <= 512  # two long inputs per batch at most, never six
    assert stats["max_items"] >= 20  # short inputs still fill a batch


def test_an_input_that_fails_in_a_batch_fails_only_its_own_request(tmp_path, run, monkeypatch):
    replica = embedder(tmp_path, "fp32", max_batch_size=64, batch_wait_timeout_s=0.2)
    encode = replica._encode
    forwards: list[list[str]] = []

    def fragile(texts, *args):  # the model fails on one input, as a bad one would
        forwards.append(list(texts))
        if any("poison" in t for t in texts):
            raise RuntimeError("the model could not read this input")
        return encode(texts, *args)

    monkeypatch.setattr(replica, "_encode", fragile)

    async def together():
        calls = [replica.embed([f"good sentence {i}"]) for i in range(4)]
        calls.insert(2, replica.embed(["a poison pill"]))
        return await asyncio.gather(*calls, return_exceptions=True)

    results = run(together())
    assert isinstance(results[2], RuntimeError)
    good = [r for i, r in enumerate(results) if i != 2]
    assert all(r.vectors.shape == (1, 384) for r in good)
    np.testing.assert_allclose(good[0].vectors, encode(["good sentence 0"]), atol=1e-5)
    # The five shared one batch, which failed; then each ran alone.
    assert len(forwards[0]) == 5 and sorted(len(f) for f in forwards[1:]) == [1] * 5


def test_a_live_precision_switch_under_load_fails_nothing_and_swaps_when_warm(tmp_path, run):
    replica = embedder(tmp_path, "fp32", CacheConfig(embedding_entries=0))
    probe = SENTENCES[0]
    reference = {"fp32": replica._encode([probe])[0]}
    answers: list = []

    async def client(k: int, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            answers.append(await replica.embed([probe, f"client {k} request {i}"]))
            i += 1

    async def switch_under_load():
        stop = asyncio.Event()
        clients = [asyncio.create_task(client(k, stop)) for k in range(4)]
        await asyncio.sleep(0.5)
        settings = {**EmbedderConfig().batching.model_dump(), "precision": "bf16"}
        await replica.reconfigure(settings)  # returns at once; the load goes on meanwhile
        assert replica.precision == "fp32" and replica.model_info()["switching_to"]
        served_while_loading = len(answers)
        await replica.switching
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)  # raises if any request failed
        return served_while_loading

    before_switch_done = run(switch_under_load())
    reference["bf16"] = replica._encode([probe])[0]
    precisions = [a.precision for a in answers]
    switch = precisions.index("bf16")
    assert switch > 0 and before_switch_done > 0
    assert set(precisions[:switch]) == {"fp32"} and set(precisions[switch:]) == {"bf16"}
    for answer in answers:  # each vector is the model's at the precision it reports
        np.testing.assert_allclose(answer.vectors[0], reference[answer.precision], atol=1e-5)
    assert not np.allclose(reference["fp32"], reference["bf16"], atol=1e-5)
    info = replica.model_info()
    assert info["precision"] == "bf16" and info["precision_requested"] == "bf16"
    assert "switching_to" not in info and info["since"]


def test_search_results_are_cached_until_the_collection_changes(client):
    ingest(client, "cached", [{"id": "a", "text": "Tides follow the Moon and the Sun."}])
    try:
        first = search(client, "cached", "What causes tides?")
        again = search(client, "cached", "What causes tides?")
        assert not first["cached"] and again["cached"]
        assert again["results"] == first["results"]
        ingest(client, "cached", [{"id": "b", "text": "The Moon pulls the oceans toward it."}])
        after = search(client, "cached", "What causes tides?")
        assert not after["cached"] and len(after["results"]) == 2
        client.delete("/v1/documents/cached/b")
        assert not search(client, "cached", "What causes tides?")["cached"]
    finally:
        client.delete("/v1/collections/cached")


def test_serve_deploy_switches_the_embedder_precision_live(server, client):
    """A new `precision` in the Embedder's user_config, applied as `serve deploy` applies it:
    the replica keeps answering on fp32 while bf16 loads, then answers on bf16."""
    test_config = next(
        d for d in TEST_CONFIG["applications"][0]["deployments"] if d["name"] == "Embedder"
    )
    codes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server, timeout=120) as c:
            i = 0
            while not stop.is_set():
                codes.append(c.post("/v1/embeddings", json={"input": f"live {i}"}).status_code)
                i += 1

    def serving(precision: str) -> None:
        deadline = time.monotonic() + 180
        while client.get("/v1/status").json()["models"]["embedder"]["precision"] != precision:
            assert time.monotonic() < deadline, f"never switched to {precision}"
            time.sleep(0.5)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        user_config = {**test_config["user_config"], "precision": "bf16"}
        redeploy([{"name": "Embedder", "user_config": user_config}])
        serving("bf16")
        time.sleep(1)
    finally:
        stop.set()
        thread.join(timeout=200)
        redeploy()  # back to the test config's fp32
        serving("fp32")
    assert codes and set(codes) == {200}, Counter(codes)
