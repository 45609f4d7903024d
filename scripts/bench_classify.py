"""The classification cascade on a labelled set built from this machine's manual pages.

    .venv/bin/python scripts/bench_classify.py [--url http://127.0.0.1:18000] [--per-label 60]

Each item is a manual page's one-line description (`apropos -s N .`), labelled by its section:
user command (1), system call (2), library function (3), file format (5), overview (7),
administration command (8). References like "(5)" are removed from the text, so the section
number never leaks into it. The set is split in two with a fixed seed:
- calibration: cosine similarities to the label descriptions (from /v1/embeddings) fit the
  softmax temperature by least negative log-likelihood (the service's `classify.temperature`);
- evaluation: /v1/classify with escalate `never`, `auto` and `always`, in requests of
  `--batch` inputs: accuracy, escalation rate, mean latency per input.
Writes docs/benchmarks/classify.json and .md. The service must run with the fitted temperature
for `auto` to mean what it says: the report names the temperature it used.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import time

import httpx
import numpy as np
from benchlib import machine, write_report

SECTIONS = {
    "1": ("user command", "a program a user runs from the shell"),
    "2": ("system call", "a Linux kernel system call"),
    "3": ("library function", "a C library function or programming interface"),
    "5": ("file format", "a configuration file or file format"),
    "7": ("overview", "an overview of a topic, a convention or a standard"),
    "8": ("administration command", "a system administration command or daemon run by root"),
}
LABELS = {name: description for name, description in SECTIONS.values()}
LINE = re.compile(r"^(?P<name>\S+) \((?P<section>\w+)\)\s+- (?P<text>.+)$")


def dataset(per_label: int, seed: int) -> list[tuple[str, str]]:
    """(text, label) pairs: `per_label` distinct descriptions per section."""
    rng = random.Random(seed)
    items = []
    for section, (label, _) in SECTIONS.items():
        out = subprocess.run(
            ["apropos", "-s", section, "."], capture_output=True, text=True, check=False
        ).stdout
        texts = set()
        for line in out.splitlines():
            match = LINE.match(line.strip())
            if match and match["section"] == section:
                text = re.sub(r"\s*\(\d\w*\)", "", match["text"]).strip()
                if len(text.split()) >= 3:
                    texts.add(text)
        chosen = rng.sample(sorted(texts), min(per_label, len(texts)))
        items += [(text, label) for text in chosen]
    rng.shuffle(items)
    return items


def fit_temperature(similarities: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The temperature with the least mean negative log-likelihood, and that NLL."""
    best = (1.0, float("inf"))
    for t in np.geomspace(0.005, 1.0, 200):
        z = similarities / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll = float(-logp[np.arange(len(truth)), truth].mean())
        if nll < best[1]:
            best = (float(t), nll)
    return best


def embed(client: httpx.Client, texts: list[str]) -> np.ndarray:
    vectors = []
    for start in range(0, len(texts), 64):
        answer = client.post("/v1/embeddings", json={"input": texts[start : start + 64]})
        answer.raise_for_status()
        vectors += [d["embedding"] for d in answer.json()["data"]]
    return np.array(vectors, dtype=np.float32)


def evaluate(client: httpx.Client, items: list[tuple[str, str]], mode: str, batch: int) -> dict:
    correct = escalated = 0
    seconds = 0.0
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        body = {"inputs": [t for t, _ in chunk], "labels": LABELS, "escalate": mode}
        began = time.perf_counter()
        answer = client.post("/v1/classify", json=body)
        seconds += time.perf_counter() - began
        answer.raise_for_status()
        for result, (_, label) in zip(answer.json()["data"], chunk, strict=True):
            correct += result["label"] == label
            escalated += result["decided_by"] == "llm"
    n = len(items)
    return {
        "mode": mode,
        "accuracy": round(correct / n, 4),
        "escalation_rate": round(escalated / n, 4),
        "mean_ms_per_input": round(seconds * 1000 / n, 1),
    }


def markdown(report: dict) -> str:
    lines = [
        "# Classification cascade",
        "",
        f"`{report['command']}` against `{report['server']}`; {report['machine']['cpu']}.",
        "",
        f"Set: {report['items']} manual-page descriptions, {len(LABELS)} labels (sections "
        f"{', '.join(SECTIONS)}); {report['calibration_items']} for calibration, "
        f"{report['evaluation_items']} for evaluation.",
        "",
        f"Temperature fitted on the calibration half: **{report['fitted_temperature']:.4f}** "
        f"(NLL {report['fitted_nll']:.3f}); the service ran with "
        f"{report['service_temperature']}, threshold {report['threshold']}.",
        "",
        "| escalate | accuracy | escalated | mean ms per input |",
        "|---|---|---|---|",
    ]
    for row in report["modes"]:
        lines.append(
            f"| {row['mode']} | {row['accuracy']:.3f} | {row['escalation_rate']:.1%} "
            f"| {row['mean_ms_per_input']} |"
        )
    lines += ["", report["verdict"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:18000")
    parser.add_argument("--per-label", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    items = dataset(args.per_label, args.seed)
    half = len(items) // 2
    calibration, evaluation = items[:half], items[half:]
    names = list(LABELS)
    with httpx.Client(base_url=args.url, timeout=600) as client:
        texts = embed(client, [t for t, _ in calibration])
        labels = embed(client, list(LABELS.values()))
        truth = np.array([names.index(label) for _, label in calibration])
        temperature, nll = fit_temperature(texts @ labels.T, truth)
        status = client.get("/v1/status").json()
        modes = [
            evaluate(client, evaluation, mode, args.batch) for mode in ("never", "auto", "always")
        ]
    never, auto, always = modes
    gained = auto["accuracy"] - never["accuracy"]
    cost = auto["mean_ms_per_input"] - never["mean_ms_per_input"]
    full_gain = always["accuracy"] - never["accuracy"]
    full_cost = always["mean_ms_per_input"] - never["mean_ms_per_input"]
    verdict = (
        f"auto escalated {auto['escalation_rate']:.1%} of inputs and changed accuracy by "
        f"{gained:+.3f} for {cost:+.0f} ms per input; always changed it by {full_gain:+.3f} for "
        f"{full_cost:+.0f} ms. "
        + (
            "The cascade buys accuracy per unit of latency better than always escalating."
            if gained > 0 and (full_cost <= 0 or gained / max(cost, 1e-9) >= full_gain / full_cost)
            else "The cascade does not buy accuracy per unit of latency here."
        )
    )
    report = {
        "command": f"python scripts/bench_classify.py --per-label {args.per_label}",
        "server": args.url,
        "machine": machine(),
        "items": len(items),
        "calibration_items": len(calibration),
        "evaluation_items": len(evaluation),
        "fitted_temperature": temperature,
        "fitted_nll": nll,
        "service_temperature": status.get("classify", {}).get("temperature", "see config"),
        "threshold": status.get("classify", {}).get("threshold", "see config"),
        "modes": modes,
        "verdict": verdict,
    }
    write_report(report, "classify", markdown)


if __name__ == "__main__":
    main()
