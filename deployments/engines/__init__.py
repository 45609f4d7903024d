"""Model code with no Ray in it: loading, precision, encoding, scoring, decoding and the
batching arithmetic. The Serve deployments in `deployments/` wrap it; tests and benchmarks
call it directly.

`load_engine` picks the generation engine a `GeneratorConfig` names."""

from __future__ import annotations

from pathlib import Path

from deployments.engines.base import GenerationEngine
from serve_app.config import GeneratorConfig


class EngineUnavailable(RuntimeError):
    """The configured generation engine cannot run in this installation: raised at start-up."""


def load_engine(config: GeneratorConfig, cache_dir: Path) -> GenerationEngine:
    """The generation engine `config.engine` names, loaded. `auto` is the transformers
    engine, which every installation has."""
    if config.engine in ("auto", "transformers"):
        from deployments.engines.hf import TransformersEngine

        return TransformersEngine(config, cache_dir)
    try:
        from deployments.engines.llamacpp import LlamaCppEngine
    except ImportError as exc:
        raise EngineUnavailable(
            f"engine {config.engine!r} needs llama-cpp-python, which did not import ({exc}): "
            "pip install llama-cpp-python, or set the generator's engine to transformers"
        ) from exc
    return LlamaCppEngine(config, cache_dir)
