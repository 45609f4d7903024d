"""/v1/classify: the embedding fast path, escalation to the generator, and bad requests."""

import pytest

pytestmark = pytest.mark.integration

LABELS = {
    "positive": "a happy, satisfied review praising the product",
    "negative": "an angry, disappointed review complaining about the product",
}


def classify(client, inputs, **extra) -> dict:
    answer = client.post("/v1/classify", json={"inputs": inputs, "labels": LABELS, **extra})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_never_stays_on_the_fast_path_and_always_asks_the_generator(client):
    inputs = ["I love it, it works perfectly.", "Terrible. It broke on the first day."]
    fast = classify(client, inputs, escalate="never")
    assert [r["decided_by"] for r in fast["data"]] == ["embedding", "embedding"]
    assert [r["label"] for r in fast["data"]] == ["positive", "negative"]
    for r in fast["data"]:
        assert 0.5 < r["probability"] <= 1 and r["escalated"] is None
    slow = classify(client, inputs, escalate="always")
    assert slow["escalated"] == 2
    for r in slow["data"]:
        assert r["decided_by"] == "llm" and r["escalated"] == "always"
        assert r["label"] in LABELS and 0 < r["probability"] <= 1  # always one of the labels


def test_auto_follows_the_calibration_and_markers_are_off_by_default(client):
    inputs = [
        "I love it, it works perfectly.",
        "The screen is lovely but the battery died in an hour.",
        "화면은 좋지만 배터리가 금방 닳아요.",
    ]
    # The default pair's calibration found no band where the generator does better, and that
    # markers do not predict fast-path errors: nothing escalates.
    status = client.get("/v1/status").json()["classify"]
    assert status["threshold"] == 0.0 and status["marker_languages"] == []
    assert status["source"].startswith("calibration:")
    answer = classify(client, inputs)
    assert answer["escalated"] == 0
    assert [r["escalated"] for r in answer["data"]] == [None, None, None]
    everything = classify(client, inputs[:1], threshold=1.0)  # a request may still ask
    assert everything["data"][0]["escalated"] == "low_confidence"
    assert everything["data"][0]["decided_by"] == "llm"


def test_escalation_is_capped_per_request(client):
    cap = 16  # classify.max_escalated
    inputs = [f"Review number {i}: it is fine, I guess." for i in range(cap + 2)]
    answer = classify(client, inputs, escalate="always")
    assert answer["escalated"] == cap and answer["skipped"] == 2
    skipped = [r for r in answer["data"] if r["skipped"]]
    assert len(skipped) == 2
    for r in skipped:
        assert r["skipped"] == "max_escalated" and r["decided_by"] == "embedding"
        assert r["label"] == r["embedding_label"]


def test_several_descriptions_and_examples(client):
    labels = {
        "positive": ["a happy review praising the product", "five stars, would buy again"],
        "negative": ["an angry review complaining about the product", "one star, broken"],
    }
    examples = {"positive": ["Great value, works well."], "negative": ["Stopped working."]}
    body = {"inputs": ["Absolutely wonderful, I use it daily."], "labels": labels}
    answer = client.post("/v1/classify", json={**body, "examples": examples, "escalate": "never"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"][0]["label"] == "positive"


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ["x"], "labels": ["only one"]},
        {"inputs": ["x"], "labels": ["a", "a"]},
        {"inputs": [], "labels": ["a", "b"]},
        {"inputs": ["x"], "labels": ["a", "b"], "escalate": "sometimes"},
        {"inputs": ["x"], "labels": ["a", "b"], "threshold": 1.5},
        {"inputs": ["x"], "labels": {"a": ""}},
        {"inputs": ["x"], "labels": {"a": [], "b": "b"}},
        {"inputs": ["x"], "labels": ["a", "b"], "examples": {"c": ["y"]}},
        {"inputs": ["x"], "labels": ["a", "b"], "examples": {"a": ["y" * 100_001]}},
    ],
)
def test_bad_classify_requests(client, body):
    answer = client.post("/v1/classify", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["message"]
