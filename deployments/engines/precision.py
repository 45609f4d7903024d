"""Precision modes: what each one does to a model, where it can run, and how `auto` picks one.

- `fp32`, `bf16`, `fp16`: weights and activations in that float type.
- `int8`: torch dynamic quantization of every `nn.Linear`, int8 weights per output channel and
  int8 activations quantized on the fly (CPU only). Per-tensor weights lost too much accuracy.
- `bnb-int8`, `bnb-nf4`: bitsandbytes LLM.int8() and 4-bit NormalFloat weights, quantized while
  loading (CUDA only).

`auto` measures instead of assuming: the fastest precision on this device whose outputs agree
with fp32's on a small calibration set. Which one wins depends on the CPU (AMX and AVX512-BF16
make bf16 fast; VNNI favours int8) or the GPU, so a fixed rule would be wrong somewhere. The
measurement takes a few seconds per candidate; its result is kept in the model cache folder,
keyed by model, device, threads and library versions, so later starts on the same machine
read it instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock

from deployments.engines.measured import MeasuredChoices

logger = logging.getLogger("ray.serve")

FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BNB = ("bnb-int8", "bnb-nf4")
# Agreement with fp32 that a precision must reach for `auto` to pick it.
MIN_MEAN_COSINE = 0.99  # embeddings
MIN_TOP1_AGREEMENT = 0.95  # next-token predictions of a causal LM
MIN_SPEARMAN = 0.98  # cross-encoder scores
# Beside the deployments, where the package data ships.
CALIBRATION = Path(__file__).parent.parent / "calibration.txt"


class UnsupportedPrecision(RuntimeError):
    """A precision this device or installation cannot run: raised at start-up, never ignored."""


def check(precision: str, device: str) -> None:
    """Raise `UnsupportedPrecision`, saying what to use instead, unless `precision` runs here."""
    if precision in BNB:
        if device != "cuda":
            raise UnsupportedPrecision(
                f"precision {precision} is bitsandbytes quantization, which needs a CUDA GPU; "
                "this replica runs on CPU. Use auto, bf16 or int8 on CPU."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UnsupportedPrecision(
                f"precision {precision} needs the bitsandbytes package: pip install bitsandbytes"
            )
    elif precision == "int8" and device != "cpu":
        raise UnsupportedPrecision(
            "precision int8 is torch dynamic quantization, which runs on CPU only; "
            "on a GPU use fp16, bnb-int8 or bnb-nf4."
        )
    elif precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise UnsupportedPrecision("this GPU has no bf16 support: use fp16 or fp32.")


def candidates(device: str, generative: bool) -> list[str]:
    """What `auto` tries on `device`, fp32 (the reference) first."""
    if device == "cpu":
        return ["fp32", "bf16", "int8"]
    out = ["fp32", "fp16"]
    if generative:
        if importlib.util.find_spec("bitsandbytes") is not None:
            out.append("bnb-nf4")
        else:
            logger.warning("auto precision: bitsandbytes is not installed, bnb-nf4 not tried")
    return out


def load_kwargs(precision: str, device: str) -> dict:
    """`from_pretrained` arguments that load a transformers model in `precision` on `device`."""
    if precision not in BNB:
        # int8 quantizes fp32 weights after loading (see `finish`).
        return {"dtype": FLOATS.get(precision, torch.float32)}
    from transformers import BitsAndBytesConfig

    if precision == "bnb-int8":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16
        )
    return {"quantization_config": quantization, "device_map": {"": device}, "dtype": torch.float16}


def finish(module: torch.nn.Module, precision: str, device: str) -> torch.nn.Module:
    """Bring a loaded module to `precision` on `device`, in eval mode."""
    if precision in BNB:  # quantized and placed while loading
        return module.eval()
    module = module.to(device=device, dtype=FLOATS.get(precision, torch.float32)).eval()
    if precision == "int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with _quiet_deprecation():
            # In place: a copy would hold the fp32 weights twice while quantizing.
            module = quantize_dynamic(
                module,
                {torch.nn.Linear: per_channel_dynamic_qconfig},
                dtype=torch.qint8,
                inplace=True,
            )
    return module


@contextlib.contextmanager
def _quiet_deprecation():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights as stored, quantized ones included (they are not parameters)."""
    seen: set[int] = set()

    def size(value: object) -> int:
        if isinstance(value, torch.Tensor):
            if value.is_quantized:
                return value.numel() * value.element_size()
            key = value.untyped_storage().data_ptr()
            if key in seen:  # tied weights count once
                return 0
            seen.add(key)
            return value.numel() * value.element_size()
        if isinstance(value, tuple | list):
            return sum(size(v) for v in value)
        return 0

    return sum(size(v) for v in module.state_dict().values())


def mean_cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return (
        torch.nn.functional.cosine_similarity(reference.float(), other.float(), dim=-1)
        .mean()
        .item()
    )


def top1_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Share of positions where both predict the same next token; rows are (positions, vocab)."""
    return (reference.argmax(-1) == other.argmax(-1)).float().mean().item()


def spearman(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Rank correlation of two score vectors."""

    def ranks(t: torch.Tensor) -> torch.Tensor:
        return t.flatten().float().argsort().argsort().float()

    a, b = ranks(reference), ranks(other)
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm()).clamp(min=1e-12)).item()


def calibration_sentences() -> list[str]:
    return [s for s in CALIBRATION.read_text().splitlines() if s.strip()]


@dataclass
class Trial:
    precision: str
    seconds: float | None  # time of one probe run, the best of three
    agreement: float | None  # with fp32's outputs
    passed: bool
    error: str | None = None


@dataclass
class Choice:
    precision: str
    trials: list[Trial]
    measured: bool  # False: read from the cache of earlier measurements


def choose(
    key: str,
    options: list[str],
    build: Callable[[str], object],
    probe: Callable[[object], torch.Tensor],
    agreement: Callable[[torch.Tensor, torch.Tensor], float],
    threshold: float,
    cache_dir: Path,
) -> Choice:
    """The fastest of `options` whose `probe` output agrees with fp32's (`options[0]`).

    `build(precision)` loads a model, `probe(model)` runs it on calibration inputs. A candidate
    that fails to build or run is skipped with a warning.
    """
    # Replicas sharing a model (the reranker and generator) measure once: the second waits for
    # the first's result, then reads it.
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    with FileLock(str(cache_dir / f"precision-{digest}.lock")):
        cached = _read_choice(cache_dir, key)
        if cached is not None and cached.precision in options:
            return cached
        trials, reference = [], None
        for precision in options:
            try:
                model = build(precision)
                output = probe(model)  # warm-up, and the output to compare
                seconds = min(_timed(probe, model) for _ in range(3))
                del model
            except Exception as exc:  # a failed candidate is reported, not fatal
                logger.warning("auto precision: %s failed on this device: %s", precision, exc)
                trials.append(Trial(precision, None, None, False, f"{type(exc).__name__}: {exc}"))
                continue
            if reference is None:
                reference = output
            score = agreement(reference, output)
            trials.append(Trial(precision, seconds, score, score >= threshold))
        passing = [t for t in trials if t.passed]
        if not passing:
            raise UnsupportedPrecision(f"auto precision: no candidate ran here ({trials})")
        best = min(passing, key=lambda t: t.seconds or float("inf"))
        choice = Choice(best.precision, trials, measured=True)
        _write_choice(cache_dir, key, choice)
        logger.info(
            "auto precision for %s: %s (%s)",
            key,
            best.precision,
            ", ".join(
                f"{t.precision} {t.seconds or 0:.3f}s agree {t.agreement or 0:.4f}" for t in trials
            ),
        )
        return choice


def resolve(
    requested: str,
    device: str,
    key: str,
    build: Callable[[str], object],
    probe: Callable[[object], torch.Tensor],
    agreement: Callable[[torch.Tensor, torch.Tensor], float],
    threshold: float,
    cache_dir: Path,
    generative: bool = False,
) -> Choice:
    """The precision a replica runs in: `requested` if it runs here, or what `auto` measures."""
    if requested != "auto":
        check(requested, device)
        return Choice(requested, [], measured=False)
    options = candidates(device, generative)
    return choose(key, options, build, probe, agreement, threshold, cache_dir)


def device_signature(device: str) -> str:
    """What a measured choice depends on: the processor, threads and library versions."""
    if device == "cuda":
        processor = torch.cuda.get_device_name()
    else:
        processor = _cpu_model() or platform.processor() or platform.machine()
    return f"{device}:{processor}:threads={torch.get_num_threads()}:torch={torch.__version__}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def _timed(probe: Callable[[object], torch.Tensor], model: object) -> float:
    start = time.perf_counter()
    probe(model)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _choices(cache_dir: Path) -> MeasuredChoices:
    return MeasuredChoices(cache_dir / "precision-choices.json")


def _read_choice(cache_dir: Path, key: str) -> Choice | None:
    entry = _choices(cache_dir).read(key)
    with contextlib.suppress(KeyError, TypeError):
        if entry is not None:
            return Choice(entry["precision"], [Trial(**t) for t in entry["trials"]], measured=False)
    return None


def _write_choice(cache_dir: Path, key: str, choice: Choice) -> None:
    entry = {"precision": choice.precision, "trials": [asdict(t) for t in choice.trials]}
    _choices(cache_dir).write(key, entry)
