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


def test_auto_escalates_on_low_confidence_and_on_contrast_markers(client):
    inputs = [
        "I love it, it works perfectly.",
        "The screen is lovely but the battery died in an hour.",
        "화면은 좋지만 배터리가 금방 닳아요.",
    ]
    answer = classify(client, inputs, threshold=0.0)  # confidence alone never escalates
    reasons = [r["escalated"] for r in answer["data"]]
    assert reasons == [None, "contrast_marker", "contrast_marker"]
    assert [r["decided_by"] for r in answer["data"]] == ["embedding", "llm", "llm"]
    everything = classify(client, inputs[:1], threshold=1.0)  # nothing is that sure
    assert everything["data"][0]["escalated"] == "low_confidence"


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ["x"], "labels": ["only one"]},
        {"inputs": ["x"], "labels": ["a", "a"]},
        {"inputs": [], "labels": ["a", "b"]},
        {"inputs": ["x"], "labels": ["a", "b"], "escalate": "sometimes"},
        {"inputs": ["x"], "labels": ["a", "b"], "threshold": 1.5},
        {"inputs": ["x"], "labels": {"a": ""}},
    ],
)
def test_bad_classify_requests(client, body):
    answer = client.post("/v1/classify", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["message"]
