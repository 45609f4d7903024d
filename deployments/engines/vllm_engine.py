"""The vLLM engine, for GPU nodes: vLLM's own scheduler, paged KV cache, continuous batching and
prefix caching behind this project's engine contract. No Ray here.

Named `vllm_engine` so that it never shadows the library it wraps. vLLM is an optional extra
(`pip install .[vllm]`, and the KubeRay GPU image); `engine: auto` tries it only where CUDA and
vLLM are both present.

The contract maps onto vLLM's step-driven `LLMEngine`:

    add     -> add_request(prompt token ids, SamplingParams) per sequence
    sample  -> one `LLMEngine.step()`: each running request's new tokens (vLLM samples
               inside its own step, so `forward` has nothing left to do)
    leave   -> abort_request (done, cancelled, or ended by a stop string here)
    logprobs-> a request with `prompt_logprobs`, one token of answer

Templating, tokenizing, stop strings and the answer's text stay this project's (the
tokenizer of the same model, `base.advance`), so an answer streams and ends the same way on
every engine. vLLM samples (temperature, top_p, seed, penalties); `no_repeat_ngram` has no
vLLM counterpart and is reported as unsupported in `info()`. The Generator deployment's GPU
share becomes vLLM's `gpu_memory_utilization`, so the replica takes no more of the GPU than
Serve gave it.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

from deployments.engines import loading
from deployments.engines.base import Sequence, advance, merge
from deployments.engines.hf import TokenizerPrompts
from serve_app.config import GeneratorConfig
from serve_app.contracts import Delta, GenerationRequest


class VllmEngine(TokenizerPrompts):
    """`GenerationEngine` over vLLM's `LLMEngine` on a CUDA device."""

    name = "vllm"
    joins_mid_decode = True

    def __init__(self, config: GeneratorConfig, cache_dir: Path) -> None:
        from vllm import EngineArgs, LLMEngine

        self.tokenizer = loading.load_tokenizer(config, cache_dir)
        self.counter = loading.TokenCounter(self.tokenizer)
        path = loading.causal_lm_path(config.model, cache_dir)
        batching = config.batching
        self.max_sequences = batching.max_batch_size
        self.share = min(max(config.num_gpus, 0.05), 0.95)
        if config.precision not in ("auto", *_DTYPES):
            raise ValueError(
                f"the vllm engine runs precision auto, {', '.join(_DTYPES)}; not {config.precision}"
            )
        args = EngineArgs(
            model=str(path),
            tokenizer=str(path),
            dtype=_DTYPES.get(config.precision, "auto"),
            gpu_memory_utilization=self.share,
            max_num_seqs=self.max_sequences,
            max_model_len=None,
            enable_prefix_caching=True,
            disable_log_stats=True,
        )
        self.llm = LLMEngine.from_engine_args(args)
        self.context_tokens = int(self.llm.model_config.max_model_len)
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        self.flight: dict[str, Sequence] = {}
        self.stashed: dict[str, list] = {}  # outputs a scoring call stepped past
        self.ids = itertools.count()
        self.lock = threading.Lock()  # steps and scoring share the one LLMEngine
        self._info: dict[str, Any] = {
            "engine": self.name,
            "device": "cuda",
            "precision": str(self.llm.model_config.dtype).removeprefix("torch."),
            "gpu_memory_utilization": self.share,
            "context_tokens": self.context_tokens,
            "max_sequences": self.max_sequences,
            "kv_cache": "paged",
            "continuous_batching": True,
            "prefix_cache": True,
            "unsupported": ["no_repeat_ngram"],
        }

    def close(self) -> None:
        """Give the GPU memory back (`auto` closes the engines it does not keep)."""
        import gc

        import torch

        engine_core = getattr(self.llm, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()

    # What the deployment shows and sizes by.

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def memory(self) -> dict[str, int]:
        import torch

        return {
            "gpu_allocated_bytes": torch.cuda.memory_allocated(),
            "gpu_reserved_bytes": torch.cuda.memory_reserved(),
        }

    # Prompts and text: this project's (TokenizerPrompts), as in the transformers engine.

    @property
    def end_of_turn(self) -> list[int]:
        return sorted(self.eos_ids)

    def sequence(self, request: GenerationRequest) -> Sequence:
        ids = self.chat_prompt(request.messages)
        prompt = ids[-max(1, self.context_tokens - request.max_tokens) :]
        return Sequence(request=request, prompt=prompt, dropped=len(ids) - len(prompt))

    # Decoding.

    def in_flight(self) -> list[Sequence]:
        return list(self.flight.values())

    def add(self, sequences: list[Sequence]) -> None:
        if len(self.flight) + len(sequences) > self.max_sequences:
            raise RuntimeError(
                f"vllm engine: {len(sequences)} sequences to add beside {len(self.flight)} "
                f"of {self.max_sequences}"
            )
        added: list[str] = []
        with self.lock:
            try:
                for s in sequences:
                    request_id = f"g{next(self.ids)}"
                    self.llm.add_request(
                        request_id, {"prompt_token_ids": s.prompt}, _sampling(s.request)
                    )
                    added.append(request_id)
                    s.engine = _State(request_id)
            except BaseException:
                self.llm.abort_request(added)
                raise
        for s in sequences:
            self.flight[s.engine.request_id] = s

    def step(self) -> None:
        self.sample()

    def forward(self) -> None:
        """Nothing: vLLM's own step (in `sample`) runs the forward pass before it samples."""

    def sample(self) -> None:
        for s in [s for s in self.flight.values() if s.abandoned]:
            s.delta = advance(s, 0, self.eos_ids, lambda ids, s=s: s.engine.text)
        with self.lock:
            self._leave_done()
            outputs = self.llm.step() if self.flight else []
        by_id = {o.request_id: o for o in outputs}
        for request_id, stashed in list(self.stashed.items()):
            by_id.setdefault(request_id, stashed[-1])
        self.stashed.clear()
        for request_id, s in self.flight.items():
            s.delta = Delta("", None, len(s.prompt), len(s.ids), s.dropped)
            output = by_id.get(request_id)
            if output is None:
                continue
            try:
                self._take(s, output)
            except Exception as exc:  # this sequence alone fails
                s.error = exc
        with self.lock:
            self._leave_done()

    def reset(self) -> None:
        with self.lock:
            self.llm.abort_request(list(self.flight))
            self.flight.clear()
            self.stashed.clear()

    def logprobs(self, rows: list[list[int]], tails: list[int]) -> list[list[float]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        wanted: dict[str, int] = {}
        with self.lock:
            for k, row in enumerate(rows):
                request_id = f"s{next(self.ids)}"
                self.llm.add_request(request_id, {"prompt_token_ids": row}, params)
                wanted[request_id] = k
            results: dict[int, Any] = {}
            while len(results) < len(rows):
                for output in self.llm.step():
                    if output.request_id in wanted:
                        if output.finished:
                            results[wanted[output.request_id]] = output
                    else:  # an answer's tokens: its next step() takes them
                        self.stashed.setdefault(output.request_id, []).append(output)
        out = []
        for k, (row, tail) in enumerate(zip(rows, tails, strict=True)):
            scored = results[k].prompt_logprobs  # per prompt token: {token: Logprob}, first None
            out.append([scored[i][row[i]].logprob for i in range(len(row) - tail, len(row))])
        return out

    # Internals.

    def _take(self, s: Sequence, output) -> None:
        """The new tokens of `output` into `s`, as one delta."""
        completion = output.outputs[0]
        s.engine.text = completion.text
        delta = None
        for token in list(completion.token_ids)[s.engine.seen :]:
            step = advance(s, token, self.eos_ids, lambda ids, s=s: s.engine.text)
            delta = step if delta is None else merge(delta, step)
            s.engine.seen += 1
            if step.finish_reason:
                break
        if delta is not None:
            s.delta = delta
        if output.finished and not (s.delta and s.delta.finish_reason):
            reason = completion.finish_reason or "stop"
            s.delta = merge(s.delta, Delta("", reason, len(s.prompt), len(s.ids), s.dropped))

    def _leave_done(self) -> None:
        done = [rid for rid, s in self.flight.items() if s.done]
        if done:
            self.llm.abort_request(done)
            for request_id in done:
                del self.flight[request_id]


class _State:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.seen = 0  # tokens of vLLM's output already taken
        self.text = ""  # vLLM's text of the answer so far


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _sampling(request: GenerationRequest):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        detokenize=True,
    )
