"""The generation model: a transformers causal LM answering chat messages, token by token.

Concurrent requests are decoded together: one left-padded prefill, then one forward pass per
step for the whole batch, reusing the KV cache. Each request keeps its own sampling settings,
stop strings and token budget; a finished request leaves the batch (and the cache) at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ray import serve
from transformers import DynamicCache

from deployments import loading
from deployments.batching import BatchedModel
from serve_app.config import GeneratorConfig


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Delta:
    """New text of one request; the last one carries `finish_reason` ("stop" or "length")."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Row:
    request: GenerationRequest
    prompt_tokens: int
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    rng: torch.Generator | None = None


@serve.deployment
class Generator(BatchedModel):
    """Chat generation with a KV cache; concurrent requests share each decoding step."""

    batched = "_generate_batch"

    def __init__(self, config: GeneratorConfig, cache_dir: Path) -> None:
        super().__init__()
        self.device = loading.pick_device(config)
        self.precision = loading.resolve_precision(config.precision, self.device)
        loading.set_threads(config.torch_threads)
        self.tokenizer, self.model = loading.load_causal_lm(
            config, cache_dir, self.device, self.precision
        )
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.context_tokens = getattr(self.model.config, "max_position_embeddings", 2048)
        self.info = {
            "role": "generation",
            "model": config.name,
            "source": config.model,
            "precision": self.precision,
            "device": self.device,
            "threads": torch.get_num_threads(),
            "context_tokens": self.context_tokens,
            "kv_cache": True,
        }
        warm = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        list(self._decode([warm, warm]))

    def memory(self) -> dict[str, int]:
        return loading.memory_report(self.model, self.device)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer to `request`; non-empty deltas, the last with a finish_reason."""
        async for delta in self._generate_batch(request):
            if delta.text or delta.finish_reason:
                yield delta

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, requests: list[GenerationRequest]):
        self.stats.record(len(requests), len(requests))
        steps = self._decode(requests)
        # Each step runs off the event loop so new requests queue for the next batch meanwhile.
        while (out := await asyncio.to_thread(next, steps, None)) is not None:
            yield out

    def _decode(self, requests: list[GenerationRequest]):
        """Yield, per decoding step, one item per request: a Delta or StopIteration once done."""
        rows = [self._row(r) for r in requests]
        prompts = [self._prompt_ids(r) for r in requests]
        for row, ids in zip(rows, prompts, strict=True):
            row.prompt_tokens = len(ids)
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        active = list(range(len(rows)))  # request index of each row still in the batch
        with torch.inference_mode():
            logits = self.model(
                input_ids=batch["input_ids"],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            positions = positions[:, -1]
            while active:
                tokens = self._sample(logits, [rows[i] for i in active])
                out: list[Delta | type[StopIteration]] = [StopIteration] * len(rows)
                for i, token in zip(active, tokens.tolist(), strict=True):
                    out[i] = self._advance(rows[i], token)
                yield out
                keep = [k for k, i in enumerate(active) if out[i].finish_reason is None]
                if len(keep) < len(active):
                    if not keep:
                        return
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    tokens, mask, positions = tokens[index], mask[index], positions[index]
                    active = [active[k] for k in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
                positions = positions + 1
                logits = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=mask,
                    position_ids=positions[:, None],
                    past_key_values=cache,
                    use_cache=True,
                ).logits[:, -1]

    def _row(self, request: GenerationRequest) -> _Row:
        rng = None
        if request.seed is not None and request.temperature > 0:
            rng = torch.Generator(self.device).manual_seed(request.seed)
        return _Row(request=request, prompt_tokens=0, rng=rng)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            request.messages, tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # Keep the most recent context when a conversation outgrows the window.
        return ids[-max(1, self.context_tokens - request.max_tokens) :]

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for k, row in enumerate(rows):
            if row.request.temperature <= 0:
                continue
            probs = torch.softmax(logits[k].float() / row.request.temperature, dim=-1)
            if row.request.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs > row.request.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
            tokens[k] = torch.multinomial(probs, 1, generator=row.rng)[0]
        return tokens

    def _advance(self, row: _Row, token: int) -> Delta:
        """Take one token into `row`; return the text that is now safe to emit."""
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        else:
            row.ids.append(token)
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        stops = row.request.stop
        cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif finish is None and len(row.ids) >= row.request.max_tokens:
            finish = "length"
        end = len(text)
        if finish is None:
            # Hold back what could still become a stop string or an incomplete character.
            end -= max((len(s) - 1 for s in stops), default=0)
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        new = text[row.sent : max(end, row.sent)]
        row.sent += len(new)
        return Delta(new, finish, row.prompt_tokens, len(row.ids) + (token in self.eos_ids))
