"""The classification cascade, stage by stage, on labelled sets built from this machine's text.

    .venv/bin/python scripts/bench_classify.py [--per-label 30] [--calibrate] [--out DIR]
    .venv/bin/python scripts/bench_classify.py --smoke  # a few items, report in a temp folder

Two labelled sets, six labels each:
- man pages: a manual page's one-line description (`apropos -s N .`), labelled by its section
  (1, 2, 3, 5, 7, 8); references like "(5)" are removed so the section never leaks into it;
- packages: a Debian package's short description (`apt-cache dumpavail`, else
  /var/lib/dpkg/status), labelled by its Section (games, fonts, sound, graphics, science, mail).
Each set is split in two with a fixed seed: calibration and evaluation.

The stages run in this process, with the deployments' own code and models (the Embedder's
encode, the Generator's constrained choice), without Ray:
1. the fast path in four request shapes: label names only, one description per label, several
   descriptions per label, and those plus `--examples` labelled examples per label (from the
   calibration half); the softmax temperature is fitted on the calibration half for each;
2. the generator (`engines.choice.choose`) on every item, with the prompt the route builds;
3. `serve_app.cascade.calibrate` on the calibration halves: the threshold that maximizes
   accuracy within the latency budget, kept only where the generator is significantly better;
   and whether contrast markers predict fast-path errors (Fisher's exact test);
4. never / auto / always on the evaluation halves, with that threshold. Latency per input is the
   fast path's measured time per input (requests of `--batch` inputs plus the label texts), and
   for escalated inputs the measured time of one constrained choice added.
`--calibrate` records the calibration for this model pair in serve_app/classify_calibration.json,
which the Classify deployment and /v1/status read. Writes OUT/classify.json and .md.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from benchkit import models
from benchkit.report import add_output_options, machine, output_dir, write_report

from serve_app import cascade
from serve_app.config import AppConfig
from serve_app.pipelines.classify import calibrated, label_vectors, prompt_messages
from serve_app.protocol.classify import ClassifyRequest

Item = tuple[str, str]  # (text, label)

MAN_SECTIONS = {
    "1": "user command",
    "2": "system call",
    "3": "library function",
    "5": "file format",
    "7": "overview",
    "8": "administration command",
}
# Several descriptions per label; the first is the one a request with one description sends.
MAN_LABELS = {
    "user command": [
        "a program a user runs from the shell",
        "a command-line tool that prints, converts or shows files and text",
        "a utility program for everyday use in a terminal",
    ],
    "system call": [
        "a Linux kernel system call",
        "a low-level kernel interface to create, read, map or signal processes and files",
        "get or set a kernel attribute of a process, file descriptor or socket",
    ],
    "library function": [
        "a C library function or programming interface",
        "a function of a software library, called from C, Perl or other code",
        "an API routine that converts, allocates, compares or formats values",
    ],
    "file format": [
        "a configuration file or file format",
        "the syntax of a configuration file under /etc",
        "the layout of a data file, database or file system format",
    ],
    "overview": [
        "an overview of a topic, a convention or a standard",
        "an introduction to a concept, protocol or set of rules",
        "a description of conventions, character sets and miscellaneous topics",
    ],
    "administration command": [
        "a system administration command or daemon run by root",
        "a tool to configure, mount, partition or manage the system and its services",
        "a background server daemon or a command for the system administrator",
    ],
}
PACKAGE_LABELS = {
    "games": [
        "a game or toy",
        "a video game, puzzle, board or card game to play",
        "game data, levels and graphics for a game",
    ],
    "fonts": [
        "a font or typeface",
        "a family of fonts for displaying and printing text",
        "TrueType or OpenType glyphs for a writing system",
    ],
    "sound": [
        "audio and music software",
        "a music player, audio editor, synthesizer or sound server",
        "a plugin or library for processing sound",
    ],
    "graphics": [
        "graphics and image software",
        "an image viewer, editor, converter or drawing program",
        "a tool or library for pictures, photos and 3D rendering",
    ],
    "science": [
        "scientific software",
        "software for mathematics, physics, chemistry, biology or astronomy",
        "a tool for scientific computation, simulation or data analysis",
    ],
    "mail": [
        "email software",
        "a mail client, mail server, or mail filter",
        "a tool to send, receive, sort or read electronic mail",
    ],
}
MAN_LINE = re.compile(r"^(?P<name>\S+) \((?P<section>\w+)\)\s+- (?P<text>.+)$")
CONTRAST = re.compile(r"\b(but|though|although|however|yet|except)\b", re.IGNORECASE)


def man_pages() -> dict[str, list[str]]:
    """Distinct one-line descriptions of manual pages, per label."""
    texts: dict[str, list[str]] = {}
    for section, label in MAN_SECTIONS.items():
        out = subprocess.run(
            ["apropos", "-s", section, "."], capture_output=True, text=True, check=False
        ).stdout
        seen = set()
        for line in out.splitlines():
            match = MAN_LINE.match(line.strip())
            if match and match["section"] == section:
                text = re.sub(r"\s*\(\d\w*\)", "", match["text"]).strip()
                if len(text.split()) >= 3:
                    seen.add(text)
        texts[label] = sorted(seen)
    return texts


def packages() -> dict[str, list[str]]:
    """Distinct short descriptions of Debian packages, per Section (the area prefix dropped)."""
    out = subprocess.run(
        ["apt-cache", "dumpavail"], capture_output=True, text=True, check=False
    ).stdout
    if "Section:" not in out:
        status = Path("/var/lib/dpkg/status")
        out = status.read_text(errors="replace") if status.exists() else ""
    texts: dict[str, set[str]] = {label: set() for label in PACKAGE_LABELS}
    for stanza in out.split("\n\n"):
        section = re.search(r"^Section: (?:\S+/)?(\S+)$", stanza, re.M)
        description = re.search(r"^Description: (.+)$", stanza, re.M)
        if section and description and section[1] in texts:
            # "(data files)", "(transitional package)": the same program's packages, once.
            text = re.sub(r"\s*\([^)]*\)", "", description[1]).strip()
            if len(text.split()) >= 3:
                texts[section[1]].add(text)
    return {label: sorted(found) for label, found in texts.items()}


def sample(texts: dict[str, list[str]], per_label: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for label, found in texts.items():
        items += [(text, label) for text in rng.sample(found, min(per_label, len(found)))]
    rng.shuffle(items)
    return items


def fit_temperature(similarities: np.ndarray, truth: np.ndarray) -> float:
    """The temperature with the least mean negative log-likelihood of the true labels."""
    best = (1.0, float("inf"))
    for t in np.geomspace(0.005, 1.0, 200):
        with np.errstate(divide="ignore", under="ignore"):
            logp = np.log(calibrated(similarities, float(t)).clip(min=1e-300))
        nll = float(-logp[np.arange(len(truth)), truth].mean())
        if nll < best[1]:
            best = (float(t), nll)
    return best[0]


class Stages:
    """The Embedder's model and the Generator's engine, loaded in this process."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.embedder = models.embedding_model(config.embedder, config.model_cache_dir)
        self.generator = models.generation_engine(config.generator, config.model_cache_dir)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts)

    def choose(self, request: ClassifyRequest, text: str) -> tuple[int | None, float]:
        """The generator's label index for `text` (None when skipped), and its seconds."""
        start = time.perf_counter()
        choice = models.choose(
            self.generator,
            prompt_messages(request, text),
            request.names,
            self.config.classify.max_prompt_tokens,
        )
        seconds = time.perf_counter() - start
        if choice.probabilities is None:
            return None, seconds
        return int(np.argmax(choice.probabilities)), seconds


def fast_variants(
    stages: Stages,
    labels: dict[str, list[str]],
    shown: dict[str, list[str]],
    calibration: list[Item],
    evaluation: list[Item],
) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """Accuracy of each request shape on both halves; the similarities of each."""
    names = list(labels)
    examples = len(shown[names[0]])
    shapes: dict[str, tuple[list[list[str]], dict[str, list[str]] | None]] = {
        "label names": ([[n] for n in names], None),
        "one description": ([labels[n][:1] for n in names], None),
        "several descriptions": ([labels[n] for n in names], None),
        f"several descriptions + {examples} examples": ([labels[n] for n in names], shown),
    }
    vectors = {text: v for text, v in _encode_all(stages, calibration, evaluation, labels, shown)}
    rows, similarities = [], {}
    for shape, (descriptions, given) in shapes.items():
        label_matrix = label_vectors(
            [np.stack([vectors[d] for d in ds]) for ds in descriptions],
            [
                np.stack([vectors[t] for t in given[n]]) if given and given[n] else None
                for n in names
            ],
        )
        sims = {}
        for half, items in (("calibration", calibration), ("evaluation", evaluation)):
            sims[half] = np.stack([vectors[t] for t, _ in items]) @ label_matrix.T
        truth = np.array([names.index(label) for _, label in calibration])
        temperature = fit_temperature(sims["calibration"], truth)
        picked = sims["calibration"].argmax(axis=1) == truth
        predicted = sims["evaluation"].argmax(axis=1)
        accuracy = float(
            np.mean(
                [names[p] == label for p, (_, label) in zip(predicted, evaluation, strict=True)]
            )
        )
        rows.append(
            {
                "shape": shape,
                "accuracy": round(accuracy, 4),
                "calibration_accuracy": round(float(picked.mean()), 4),
                "temperature": temperature,
            }
        )
        similarities[shape] = sims
    return rows, similarities


def _encode_all(stages, calibration, evaluation, labels, shown):
    texts = list(
        dict.fromkeys(
            [t for t, _ in calibration + evaluation]
            + list(labels)
            + [d for ds in labels.values() for d in ds]
            + [t for ts in shown.values() for t in ts]
        )
    )
    return zip(texts, stages.encode(texts), strict=True)


def fast_ms_per_input(stages: Stages, items: list[Item], labels: list[str], batch: int) -> float:
    """What the route embeds per request: `batch` inputs and the label texts."""
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        stages.encode([t for t, _ in items[i : i + batch]] + labels)
    return (time.perf_counter() - start) * 1000 / len(items)


def run_set(
    stages: Stages, name: str, texts: Callable[[], dict[str, list[str]]], labels, args
) -> dict:
    items = sample(texts(), args.per_label, args.seed)
    half = len(items) // 2
    names = list(labels)
    # The calibration half's first `--examples` items of each label are the requests'
    # examples; the rest calibrate. The evaluation half is never seen before it is scored.
    shown: dict[str, list[str]] = {name: [] for name in names}
    calibration, evaluation = [], items[half:]
    for text, label in items[:half]:
        if len(shown[label]) < args.examples:
            shown[label].append(text)
        else:
            calibration.append((text, label))
    shapes, sims = fast_variants(stages, labels, shown, calibration, evaluation)
    best = max(reversed(shapes), key=lambda row: row["calibration_accuracy"])  # ties: richer
    # The request the cascade is measured with: the best shape, at the service's temperature.
    temperature = stages.config.classify.temperature
    request = ClassifyRequest(inputs=["x"], labels={n: labels[n] for n in names}, escalate="always")
    halves = {}
    for half, part in (("calibration", calibration), ("evaluation", evaluation)):
        probabilities = calibrated(sims[best["shape"]][half], temperature)
        truth = np.array([names.index(label) for _, label in part])
        slow, seconds = zip(*(stages.choose(request, text) for text, _ in part), strict=True)
        halves[half] = {
            "confidence": probabilities.max(axis=1),
            "fast": probabilities.argmax(axis=1) == truth,
            "slow": np.array([s is not None and s == t for s, t in zip(slow, truth, strict=True)]),
            "markers": np.array([bool(CONTRAST.search(text)) for text, _ in part]),
            "slow_ms": 1000 * float(np.mean(seconds)),
        }
    fast_ms = fast_ms_per_input(
        stages, evaluation, [d for ds in labels.values() for d in ds], args.batch
    )
    return {
        "name": name,
        "labels": names,
        "items": len(items),
        "calibration_items": len(calibration),
        "example_items": sum(len(texts) for texts in shown.values()),
        "evaluation_items": len(evaluation),
        "shapes": shapes,
        "cascade_shape": best["shape"],
        "fast_ms": fast_ms,
        "halves": halves,
    }


def modes(result: dict, threshold: float) -> list[dict]:
    """never / auto / always on the evaluation half, with `threshold` for auto."""
    half = result["halves"]["evaluation"]
    rows = []
    for mode, escalated in (
        ("never", np.zeros_like(half["fast"])),
        ("auto", half["confidence"] < threshold),
        ("always", np.ones_like(half["fast"])),
    ):
        correct = np.where(escalated, half["slow"], half["fast"])
        rows.append(
            {
                "mode": mode,
                "accuracy": round(float(correct.mean()), 4),
                "escalation_rate": round(float(escalated.mean()), 4),
                "mean_ms_per_input": round(
                    result["fast_ms"] + float(escalated.mean()) * half["slow_ms"], 1
                ),
            }
        )
    return rows


def pooled(results: list[dict], key: str) -> np.ndarray:
    return np.concatenate([r["halves"]["calibration"][key] for r in results])


def markdown(report: dict) -> str:
    c = report["calibration"]
    lines = [
        "# Classification cascade",
        "",
        f"`{report['command']}`, in process (the deployments' code, no Ray); "
        f"{report['machine']['cpu']}. Models: {report['models']}.",
        "",
        "## Calibration (both sets' calibration halves)",
        "",
        f"Threshold in effect: **{c['threshold']:.3f}** (escalate below it; 0 escalates "
        f"nothing). On {c['items']} items: never {c['never_accuracy']:.3f}, always "
        f"{c['always_accuracy']:.3f}, auto {c['accuracy']:.3f} at {c['mean_ms']:.1f} ms per input "
        f"(budget {c['latency_budget_ms']:.1f} ms). {_markers(report)}",
        "",
        "| fast-path confidence | items | fast path accuracy | generator accuracy |",
        "|---|---|---|---|",
    ]
    for band in c["bands"]:
        if band["items"]:
            lines.append(
                f"| {band['low']:.1f}-{band['high']:.1f} | {band['items']} "
                f"| {band['fast_accuracy']:.3f} | {band['slow_accuracy']:.3f} |"
            )
    for result in report["sets"]:
        lines += [
            "",
            f"## {result['name']}: {result['items']} items, labels {', '.join(result['labels'])}",
            "",
            f"{result['example_items']} as examples, {result['calibration_items']} for "
            f"calibration, {result['evaluation_items']} for evaluation. The fast path by request "
            "shape (argmax; the cascade uses the shape best on the calibration items):",
            "",
            "| labels sent as | evaluation accuracy | calibration accuracy | fitted temperature |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {s['shape']} | {s['accuracy']:.3f} | {s['calibration_accuracy']:.3f} "
            f"| {s['temperature']:.3f} |"
            for s in result["shapes"]
        ]
        lines += [
            "",
            f"The cascade with `{result['cascade_shape']}` (evaluation half):",
            "",
            "| escalate | accuracy | escalated | mean ms per input |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m['mode']} | {m['accuracy']:.3f} | {m['escalation_rate']:.1%} "
            f"| {m['mean_ms_per_input']} |"
            for m in result["modes"]
        ]
        lines += ["", result["verdict"]]
    lines.append("")
    return "\n".join(lines)


def _markers(report: dict) -> str:
    c = report["calibration"]
    marked = report["marked_items"]
    if c["markers_p_value"] is None:
        found = f"{marked} of {c['items']} calibration items hold a contrast marker"
        return f"Contrast markers: {found}, too few to test, so they are off by default."
    verdict = "predict" if c["markers_predict_errors"] else "do not predict"
    return (
        f"Contrast markers ({marked} items) {verdict} fast-path errors (Fisher's exact test, "
        f"p = {c['markers_p_value']:.3g}): {'on' if c['markers_predict_errors'] else 'off'} "
        "by default."
    )


def verdict(rows: list[dict]) -> str:
    never, auto, always = rows
    gain = auto["accuracy"] - never["accuracy"]
    cost = auto["mean_ms_per_input"] - never["mean_ms_per_input"]
    per_ms = f"{gain / cost * 1000:+.4f} accuracy per added second" if cost > 0 else "no cost"
    ok = auto["accuracy"] >= max(never["accuracy"], always["accuracy"])
    ratio = auto["mean_ms_per_input"] / max(never["mean_ms_per_input"], 1e-9)
    return (
        f"auto {auto['accuracy']:.3f} vs never {never['accuracy']:.3f} and always "
        f"{always['accuracy']:.3f}: {'meets' if ok else 'misses'} the target "
        f"auto >= max(never, always); latency {ratio:.2f}x "
        f"never ({per_ms})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-label", type=int, default=30)
    parser.add_argument("--examples", type=int, default=5, help="Examples per label.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--calibrate", action="store_true", help="Record the calibration.")
    add_output_options(parser, "2 items per label, never records a calibration")
    args = parser.parse_args()
    if args.smoke:
        args.per_label, args.examples, args.calibrate = 2, 1, False
    config = AppConfig()
    stages = Stages(config)
    sets = [("man pages", man_pages, MAN_LABELS), ("packages", packages, PACKAGE_LABELS)]
    results = []
    for name, texts, labels in sets:
        found = texts()
        # Examples, calibration and evaluation each need items of every label.
        if min(len(found.get(label, [])) for label in labels) < args.examples + 2:
            print(f"skipped the {name} set: too few labelled items on this machine")
            continue
        results.append(run_set(stages, name, lambda found=found: found, labels, args))
    if not results:
        raise SystemExit("no labelled set has enough items on this machine")
    fast_ms = float(np.mean([r["fast_ms"] for r in results]))
    slow_ms = float(np.mean([r["halves"]["calibration"]["slow_ms"] for r in results]))
    budget = config.classify.latency_budget_ms or 2 * fast_ms
    calibration = cascade.calibrate(
        pooled(results, "confidence"),
        pooled(results, "fast"),
        pooled(results, "slow"),
        fast_ms,
        slow_ms,
        budget,
    )
    calibration.markers_p_value = cascade.markers_predict_errors(
        pooled(results, "markers"), pooled(results, "fast")
    )
    calibration.markers_predict_errors = (
        calibration.markers_p_value is not None and calibration.markers_p_value < cascade.ALPHA
    )
    command = f"python scripts/bench_classify.py --per-label {args.per_label}" + (
        " --calibrate" if args.calibrate else ""
    )
    calibration.source = f"({command}, {time.strftime('%Y-%m-%d')}, {calibration.items} items)"
    marked = int(pooled(results, "markers").sum())
    for result in results:
        result["modes"] = modes(result, calibration.threshold)
        result["verdict"] = verdict(result["modes"])
        result.pop("halves")
    report = {
        "command": command,
        "machine": machine(),
        "models": cascade.pair_key(config),
        "calibration": asdict(calibration),
        "marked_items": marked,
        "sets": results,
    }
    if args.calibrate:
        cascade.record(calibration, cascade.pair_key(config))
    write_report(report, "classify", markdown, output_dir(args))


if __name__ == "__main__":
    main()
