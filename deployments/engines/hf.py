"""The transformers generation engine: a causal LM decoding many sequences at once with a KV
cache, joined between steps (continuous batching). No Ray here.

Named `hf` rather than `transformers` so that it never shadows the library it wraps.

Sequences added together are prefilled together (one left-padded forward pass) and merged
into the state in flight: the shorter cache is left-padded to the longer. Each step takes one
forward pass for every sequence in flight; a sequence that is done leaves the cache at once,
and cache columns that have become padding in every row are trimmed.

One sequence cannot fail another: sampling runs on sanitized float32 logits, and anything
else that raises for one sequence inside a step (sampling, detokenizing, stop handling) ends
that sequence alone, with the error as its output. Only a failed forward pass, which holds
every sequence, raises from `step`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from deployments.engines import loading
from deployments.engines.base import Sequence, advance
from deployments.engines.sampling import new_rng, sample_row
from serve_app.config import GeneratorConfig
from serve_app.contracts import GenerationRequest

logger = logging.getLogger("ray.serve")


@dataclass
class DecodeState:
    """Tensors of the sequences in flight, row k belonging to `sequences[k]`."""

    sequences: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # (rows, cached tokens): 0 where a row is left-padded
    positions: torch.Tensor  # (rows,) position of each row's last token
    logits: torch.Tensor  # (rows, vocab) next-token logits, not yet sampled
    sampled: list[int] | None = None  # each row's token from `logits`, not yet passed forward


@dataclass
class _Decoding:
    """A sequence's random generator and its text, decoded incrementally: each step decodes a
    short window of the newest tokens, not the whole answer again (as TGI and vLLM do). The
    window starts a few tokens back, so a token whose text depends on the one before it (a
    leading space, a multi-byte character split across tokens) decodes as it would in full."""

    rng: torch.Generator | None
    settled: str = ""  # text of ids[:read], complete characters only
    prefix: int = 0  # the window's first id
    read: int = 0  # ids whose text is in `settled`

    def text(self, engine: TransformersEngine, ids: list[int]) -> str:
        before = engine._decode(ids[self.prefix : self.read])
        after = engine._decode(ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.settled += after[len(before) :]
            self.prefix, self.read = self.read, len(ids)
        return self.settled


class TokenizerPrompts:
    """Tokenizing and chat templating with a transformers tokenizer (`self.tokenizer`, and
    `self.counter`, its `loading.TokenCounter`): shared by the engines that use one."""

    tokenizer: Any
    counter: loading.TokenCounter

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.counter(texts, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.tokenize([text])[0]


class TransformersEngine(TokenizerPrompts):
    """`GenerationEngine` over a transformers causal LM (deployments/engines/base.py)."""

    name = "transformers"
    max_sequences = 0  # bounded by the cache's tokens only

    def __init__(self, config: GeneratorConfig, cache_dir: Path) -> None:
        """Load `config.model` at its precision (`auto`: measured) on this replica's device."""
        device = loading.pick_device(config)
        loading.set_threads(config.torch_threads)
        tokenizer = loading.load_tokenizer(config, cache_dir)
        choice = loading.causal_lm_precision(config, cache_dir, device, tokenizer)
        model = loading.load_causal_lm(config, cache_dir, device, choice.precision)
        self._bind(tokenizer, model, device)
        self.precision = choice.precision
        self._info.update(
            precision=choice.precision,
            precision_requested=config.precision,
            precision_trials=[asdict(t) for t in choice.trials],
            precision_measured=choice.measured,
        )

    @classmethod
    def from_model(cls, tokenizer, model, device: str = "cpu") -> TransformersEngine:
        """An engine over a model already loaded (and its left-padding tokenizer)."""
        engine = cls.__new__(cls)
        engine._bind(tokenizer, model, device)
        engine.precision = str(getattr(model, "dtype", torch.float32)).removeprefix("torch.")
        engine._info["precision"] = engine.precision
        return engine

    def _bind(self, tokenizer, model, device: str) -> None:
        """Take `model` and its tokenizer, with nothing in flight, and warm them up with two
        sequences (which also shows whether the cache can merge mid-decode)."""
        self.tokenizer, self.model, self.device = tokenizer, model, device
        self.counter = loading.TokenCounter(tokenizer)
        eos = model.generation_config.eos_token_id
        self.eos_ids = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.context_tokens = getattr(model.config, "max_position_embeddings", 2048)
        self.state: DecodeState | None = None
        self.joins_mid_decode = True
        warm = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        self.add([self.sequence(warm), self.sequence(warm)])
        # Only plain growing caches can be stacked mid-decode; models with other cache layers
        # (sliding window, ...) take new sequences when nothing is in flight instead.
        assert self.state is not None
        layers = self.state.cache.layers
        self.joins_mid_decode = all(type(layer) is DynamicLayer for layer in layers)
        while self.state is not None:
            self.step()
        self._info: dict[str, Any] = {
            "engine": self.name,
            "device": device,
            "threads": torch.get_num_threads(),
            "context_tokens": self.context_tokens,
            "kv_cache": True,
            "continuous_batching": self.joins_mid_decode,
        }

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def memory(self) -> dict[str, int]:
        return loading.memory_report(self.model, self.device)

    @property
    def end_of_turn(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    def sequence(self, request: GenerationRequest) -> Sequence:
        ids = self.chat_prompt(request.messages)
        # Keep the most recent context when a conversation outgrows the window.
        prompt = ids[-max(1, self.context_tokens - request.max_tokens) :]
        return Sequence(
            request=request,
            prompt=prompt,
            dropped=len(ids) - len(prompt),
            engine=_Decoding(new_rng(request, self.device)),
        )

    def in_flight(self) -> list[Sequence]:
        return list(self.state.sequences) if self.state else []

    def reset(self) -> None:
        self.state = None

    def add(self, sequences: list[Sequence]) -> None:
        new = self._prefill(sequences)
        self.state = new if self.state is None else merge(self.state, new)

    @torch.inference_mode()
    def _prefill(self, sequences: list[Sequence]) -> DecodeState:
        """The decode state of `sequences` alone, after one left-padded pass over their prompts."""
        batch = self.counter.pad([s.prompt for s in sequences], self.device)
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        return DecodeState(sequences, cache, mask, positions[:, -1], logits)

    def step(self) -> None:
        self.sample()
        self.forward()

    @torch.inference_mode()
    def sample(self) -> None:
        """One token per sequence, and its text. A sequence whose sampling or advancing raises
        takes the error as its output (and leaves at `forward`); the others go on."""
        state = self.state
        assert state is not None
        logits = state.logits.float()
        chosen = []
        for k, sequence in enumerate(state.sequences):
            try:
                decoding: _Decoding = sequence.engine
                token = sample_row(logits[k], sequence.request, sequence.ids, decoding.rng)
                sequence.delta = advance(
                    sequence, token, self.eos_ids, lambda ids, d=decoding: d.text(self, ids)
                )
            except Exception as exc:
                logger.warning("Generator: a sequence failed in a decode step (%r)", exc)
                token, sequence.error = 0, exc
            chosen.append(token)
        state.sampled = chosen

    @torch.inference_mode()
    def forward(self) -> None:
        """Drop finished sequences, and run the next pass on the sampled tokens."""
        state = self.state
        assert state is not None and state.sampled is not None
        tokens = torch.tensor(state.sampled, device=state.logits.device)
        state.sampled = None
        keep = [k for k, s in enumerate(state.sequences) if not s.done]
        if not keep:
            self.state = None
            return
        if len(keep) < len(state.sequences):
            index = torch.tensor(keep, device=self.device)
            state.cache.batch_select_indices(index)
            state.sequences = [state.sequences[k] for k in keep]
            tokens, state.mask, state.positions = (
                tokens[index],
                state.mask[index],
                state.positions[index],
            )
            trim_padding(state)
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(keep), 1)], dim=-1)
        state.positions = state.positions + 1
        state.logits = self.model(
            input_ids=tokens[:, None],
            attention_mask=state.mask,
            position_ids=state.positions[:, None],
            past_key_values=state.cache,
            use_cache=True,
        ).logits[:, -1]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logprobs(self, rows: list[list[int]], tails: list[int]) -> list[list[float]]:
        longest = max(tails)
        batch = self.counter.pad(rows, self.device)
        token_logprobs = loading.tail_logprobs(self.model, batch, longest)
        return [token_logprobs[k, longest - n :].tolist() for k, n in enumerate(tails)]


def merge(old: DecodeState, new: DecodeState) -> DecodeState:
    """Stack two decode states, left-padding the shorter one's cache and mask. The new
    tensors are all built before any is swapped in, so a merge that fails (out of memory)
    leaves `old` as it was."""
    length = max(old.mask.shape[1], new.mask.shape[1])
    layers = [
        (
            torch.cat([left_pad(a.keys, length, -2), left_pad(b.keys, length, -2)]),
            torch.cat([left_pad(a.values, length, -2), left_pad(b.values, length, -2)]),
        )
        for a, b in zip(old.cache.layers, new.cache.layers, strict=True)
    ]
    mask = torch.cat([left_pad(old.mask, length, -1), left_pad(new.mask, length, -1)])
    positions = torch.cat([old.positions, new.positions])
    logits = torch.cat([old.logits, new.logits])
    for layer, (keys, values) in zip(old.cache.layers, layers, strict=True):
        layer.keys, layer.values = keys, values
    return DecodeState(old.sequences + new.sequences, old.cache, mask, positions, logits)


def left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` padded with zeros at the start of `dim` (a negative index) to `length`."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)


def trim_padding(state: DecodeState) -> None:
    """Drop leading cache columns that are padding in every remaining row."""
    used = state.mask.any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start == 0:
        return
    state.mask = state.mask[:, start:]
    for layer in state.cache.layers:
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
