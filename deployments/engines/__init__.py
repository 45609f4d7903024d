"""Model code with no Ray in it: loading, precision, encoding, scoring, decoding and the
batching arithmetic. The Serve deployments in `deployments/` wrap it; tests and benchmarks
call it directly.

`load_engine` loads the generation engine a `GeneratorConfig` names. `auto` measures, once per
machine and model (like `precision: auto`), every engine that can run the model here, and
keeps the one whose typical answers users wait least for (`EngineTrial.wait_s`): llama.cpp
only for a GGUF model with llama-cpp-python installed (its weights as shipped or re-quantized,
`gguf.py`), vllm only on CUDA with vllm installed, and transformers for any model. The trials
are kept in the model cache folder and shown in `/v1/status`."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from filelock import FileLock

from deployments.engines import gguf, loading, precision
from deployments.engines.base import GenerationEngine, counting_sequences, run_to_end
from deployments.engines.measured import MeasuredChoices
from serve_app.config import GeneratorConfig
from serve_app.contracts import GenerationRequest

logger = logging.getLogger(__name__)
# What `auto` times: greedy answers of this many tokens, alone and as a full batch, and the
# prefill of one RAG-sized prompt (sources fill about this many words).
TRIAL_TOKENS = 24
TRIAL_ROUNDS = 3
TRIAL_PROMPT_WORDS = 600
# The waits `auto` weighs, as (prompt tokens, answer tokens, streams decoding together): a
# chat answer alone, a RAG answer alone and its first token (what a reader of the stream waits
# for), and a chat answer while every slot decodes (`None`: the trial's full batch). A RAG
# prompt holds 3 sources (RagRequest.rerank_top_n) of up to 200 tokens (Chunking.max_tokens)
# beside the system prompt and the question twice: ~750 tokens over this repository's docs.
WAIT_SHAPES: dict[str, tuple[int, int, int | None]] = {
    "chat": (40, 64, 1),
    "rag": (750, 64, 1),
    "rag_first_token": (750, 1, 1),
    "busy": (40, 64, None),
}
# What each Generator deployment answers, as the waits its `auto` weighs: one Generator for
# every route, or chat (and classify) on one and RAG on its own (`rag.generator: own`). A RAG
# answer is waited for whole (JSON) or read as it streams: both count, so an engine that
# starts a RAG answer 4x sooner wins one that ends it 25% sooner.
ANSWERS: dict[str, tuple[str, ...]] = {
    "all": ("chat", "rag", "busy"),
    "chat": ("chat", "busy"),
    "rag": ("rag", "rag_first_token"),
}


class EngineUnavailable(RuntimeError):
    """The configured generation engine cannot run in this installation: raised at start-up."""


@dataclass
class EngineTrial:
    engine: str
    tokens_per_s_1: float | None  # one sequence decoding
    tokens_per_s_full: float | None  # `full_sequences` decoding together
    error: str | None = None
    prefill_tokens_per_s: float | None = None  # one long (RAG-sized) prompt read
    full_sequences: int | None = None

    def waits_s(self, shapes: tuple[str, ...] = ANSWERS["all"]) -> dict[str, float] | None:
        """Seconds a user waits for each answer of `shapes` (`WAIT_SHAPES`): its prompt read,
        then its tokens at this engine's rate per stream (None: a rate was not measured)."""
        one, full, prefill = self.tokens_per_s_1, self.tokens_per_s_full, self.prefill_tokens_per_s
        if not (one and full and prefill and self.full_sequences):
            return None
        waits = {}
        for shape in shapes:
            prompt, answer, streams = WAIT_SHAPES[shape]
            together = streams or self.full_sequences
            per_stream = one if together == 1 else full / together
            waits[shape] = prompt * together / prefill + answer / per_stream
        return waits

    def wait_s(self, shapes: tuple[str, ...] = ANSWERS["all"]) -> float:
        """The geometric mean of `waits_s`, lower is better (inf: not fully measured). The whole
        answer counts: a prompt read 8x as fast saves a chat answer a few hundred ms, while
        decoding 3x as fast saves it seconds (bf16 matrix units read prompts fast, GGUF
        kernels decode fast); a RAG answer's long prompt can turn that around."""
        waits = self.waits_s(shapes)
        if waits is None:
            return math.inf
        return math.prod(waits.values()) ** (1 / len(waits))


@dataclass
class EngineChoice:
    engine: str
    trials: list[EngineTrial]
    measured: bool  # False: read from an earlier measurement on this machine
    reason: str

    answers: tuple[str, ...] = ANSWERS["all"]  # the shapes it was chosen for

    def report(self, requested: str) -> dict:
        """How the engine was chosen, as the Generator's `model_info` reports it."""
        return {
            "engine": self.engine,
            "engine_requested": requested,
            "engine_reason": self.reason,
            "engine_measured": self.measured,
            "engine_answers": list(self.answers),
            "engine_trials": [
                asdict(t) | {"waits_s": _rounded(t.waits_s(self.answers))} for t in self.trials
            ],
        }


def _rounded(waits: dict[str, float] | None) -> dict[str, float] | None:
    return None if waits is None else {shape: round(w, 2) for shape, w in waits.items()}


def load_engine(
    config: GeneratorConfig, cache_dir: Path, answers: str = "all"
) -> tuple[GenerationEngine, EngineChoice]:
    """The generation engine `config.engine` names (`auto`: the one measured to give the
    `answers` (`ANSWERS`) soonest here), loaded and warm, and how it was chosen."""
    shapes = ANSWERS[answers]
    if config.engine != "auto":
        engine = _load(config.engine, config, cache_dir)
        return engine, EngineChoice(engine.name, [], False, "named in the configuration", shapes)
    return _auto(config, cache_dir, shapes)


def gguf_file(model: str) -> Path | None:
    """The GGUF file `model` names: a bundled GGUF model's, or a path to a `.gguf` file."""
    bundled = loading.BUNDLED.get(model)
    if bundled is not None and bundled.gguf_file and (folder := bundled.path()) is not None:
        return folder / bundled.gguf_file
    path = Path(model)
    return path if path.suffix == ".gguf" and path.is_file() else None


def candidates(config: GeneratorConfig) -> dict[str, str | None]:
    """Each engine, and why it cannot run this model here (None: it can)."""
    why_not_llama = None
    if gguf_file(config.model) is None:
        why_not_llama = "the model is not a GGUF file"
    elif config.precision != "auto":
        why_not_llama = (
            f"precision {config.precision} was asked, and llama.cpp runs the GGUF's own "
            "quantization or a measured re-quantization of it (precision auto lets it)"
        )
    else:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            why_not_llama = f"llama-cpp-python is not installed ({exc})"
    return {"llama.cpp": why_not_llama, "vllm": _why_not_vllm(config), "transformers": None}


def _why_not_vllm(config: GeneratorConfig) -> str | None:
    if loading.pick_device(config) != "cuda":
        return "vllm runs on CUDA, and this replica has no GPU"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install .[vllm])"
    return None


def _load(name: str, config: GeneratorConfig, cache_dir: Path) -> GenerationEngine:
    if name == "transformers":
        from deployments.engines.hf import TransformersEngine

        return TransformersEngine(config, cache_dir)
    if name == "vllm":
        if (why_not := _why_not_vllm(config)) is not None:
            raise EngineUnavailable(f"engine 'vllm' cannot run here: {why_not}")
        from deployments.engines.vllm_engine import VllmEngine

        return VllmEngine(config, cache_dir)
    why_not = candidates(config)["llama.cpp"]
    if why_not is not None:
        raise EngineUnavailable(
            f"engine 'llama.cpp' cannot run {config.model!r}: {why_not}. Install "
            "llama-cpp-python (make setup does), name a .gguf model, or set the generator's "
            "engine to transformers or auto"
        )
    from deployments.engines.llamacpp import LlamaCppEngine

    source: Path = gguf_file(config.model)  # type: ignore[assignment]
    device = loading.pick_device(config)
    weights = gguf.choose(source, cache_dir, config.threads, _signature(device))
    batching = config.batching
    return LlamaCppEngine(
        gguf.weights_file(source, weights.precision, cache_dir),
        max_sequences=batching.max_batch_size,
        # Each sequence's slot holds its share of the token bound: prompt and answer.
        slot_tokens=max(batching.max_batch_tokens // batching.max_batch_size, 256),
        threads=config.threads,
        prompt_threads=config.prompt_threads or config.threads,
        gpu_layers=-1 if device == "cuda" else 0,
        weights={
            "weights": weights.precision,
            "precision_trials": [asdict(t) for t in weights.trials],
            "precision_measured": weights.measured,
        },
    )


def _auto(
    config: GeneratorConfig, cache_dir: Path, shapes: tuple[str, ...]
) -> tuple[GenerationEngine, EngineChoice]:
    possible = candidates(config)
    runnable = [name for name, why_not in possible.items() if why_not is None]
    if len(runnable) == 1:
        reasons = "; ".join(f"{n}: {w}" for n, w in possible.items() if w)
        return _load(runnable[0], config, cache_dir), EngineChoice(
            runnable[0], [], False, f"the only engine that runs it here ({reasons})", shapes
        )
    key = "|".join(
        [
            config.model,
            *runnable,
            f"threads={config.threads}",
            f"prompt_threads={config.prompt_threads}",
            f"sequences={config.batching.max_batch_size}",
            "scored=wait",
            _signature(loading.pick_device(config)),
        ]
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    # Replicas starting together measure once: the others wait, then read the trials (the
    # rates do not depend on the answers a deployment weighs them for).
    with FileLock(str(cache_dir / f"engine-{digest}.lock")):
        if (trials := _read(cache_dir, key)) is not None:
            measured = [t for t in trials if t.engine in runnable and t.error is None]
            if measured:
                best = min(measured, key=lambda trial: trial.wait_s(shapes))
                reason = "the shortest waits measured here (earlier)"
                known = EngineChoice(best.engine, trials, False, reason, shapes)
                return _load(best.engine, config, cache_dir), known
        engines, failed = {}, []
        for name in runnable:
            try:
                engines[name] = _load(name, config, cache_dir)
            except Exception as exc:  # a failed candidate is reported, not fatal
                logger.warning("engine auto: %s failed here: %s", name, exc)
                failed.append(EngineTrial(name, None, None, f"{type(exc).__name__}: {exc}"))
        if not engines:
            raise EngineUnavailable(f"engine auto: no engine ran here ({failed})")
        # Interleaved rounds, the best of each: a busy machine only ever slows a round down.
        rounds = [[_trial(n, e, config) for n, e in engines.items()] for _ in range(TRIAL_ROUNDS)]
        trials = [
            EngineTrial(
                name,
                max(r[k].tokens_per_s_1 or 0.0 for r in rounds),
                max(r[k].tokens_per_s_full or 0.0 for r in rounds),
                prefill_tokens_per_s=max(r[k].prefill_tokens_per_s or 0.0 for r in rounds),
                full_sequences=rounds[0][k].full_sequences,
            )
            for k, name in enumerate(engines)
        ]
        best = min(trials, key=lambda trial: trial.wait_s(shapes))
        for name, engine in engines.items():
            if name != best.engine:
                _close(engine)
        trials += failed
        best_engine = engines[best.engine]
        reason = "the shortest waits measured here"
        choice = EngineChoice(best.engine, trials, True, reason, shapes)
        _write(cache_dir, key, choice)
        logger.info("engine auto for %s: %s (%s)", config.model, best.engine, trials)
        return best_engine, choice


def _signature(device: str) -> str:
    """What a measured choice depends on: the processor, the cores this process may use and
    the engines' versions (not torch's current thread count, which engines change)."""
    processor = precision.device_signature(device).rsplit(":threads=", 1)[0]
    versions = []
    for package in ("torch", "transformers", "llama_cpp_python"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{package}={metadata.version(package)}")
    return ":".join([processor, f"cores={len(os.sched_getaffinity(0))}", *versions])


def _trial(name: str, engine: GenerationEngine, config: GeneratorConfig) -> EngineTrial:
    """Greedy decoding rates of `engine`: one sequence, then a full batch of distinct prompts."""
    full = max(1, min(config.batching.max_batch_size, engine.max_sequences or 8))
    rates = []
    for count in (1, full):
        sequences = counting_sequences(engine, count, TRIAL_TOKENS)
        start = time.perf_counter()
        run_to_end(engine, sequences)
        tokens = sum(s.delta.completion_tokens for s in sequences if s.delta)
        rates.append(tokens / (time.perf_counter() - start))
    # A prompt no earlier one began with: a kept prefix must not read it for the engine.
    words = " ".join(f"source{k % 97} says item {k} costs {k % 13} units." for k in range(99))
    head = f"Trial {time.time_ns()}."
    prompt = GenerationRequest(
        messages=[
            {"role": "user", "content": " ".join([head, *words.split()][:TRIAL_PROMPT_WORDS])}
        ],
        max_tokens=1,
    )
    sequence = engine.sequence(prompt)
    start = time.perf_counter()
    engine.add([sequence])
    prefill = len(sequence.prompt) / (time.perf_counter() - start)
    while engine.in_flight():
        engine.step()
    return EngineTrial(
        name, round(rates[0], 1), round(rates[1], 1), None, round(prefill, 1), full_sequences=full
    )


def _close(engine: GenerationEngine) -> None:
    close = getattr(engine, "close", None)
    if callable(close):
        close()


def _choices(cache_dir: Path) -> MeasuredChoices:
    return MeasuredChoices(cache_dir / "engine-choices.json")


def _read(cache_dir: Path, key: str) -> list[EngineTrial] | None:
    """The trials of an earlier measurement of `key` on this machine."""
    entry = _choices(cache_dir).read(key)
    with contextlib.suppress(KeyError, TypeError):
        if entry is not None:
            return [EngineTrial(**t) for t in entry["trials"]]
    return None


def _write(cache_dir: Path, key: str, choice: EngineChoice) -> None:
    entry = {
        "engine": choice.engine,
        "reason": choice.reason,
        "trials": [asdict(t) for t in choice.trials],
    }
    _choices(cache_dir).write(key, entry)
