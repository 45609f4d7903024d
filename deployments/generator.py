"""The generation model: a transformers causal LM answering chat messages, token by token.

Requests reach the model through `@serve.batch`: requests arriving together are prefilled
together (one left-padded forward pass). Each admitted batch then joins one running decode
loop, which takes one forward pass per step for every sequence in flight, with a KV cache.
New batches join the loop between steps (continuous batching), so a request arriving while
others decode does not wait for them to finish. Each sequence keeps its own sampling settings,
stop strings and token budget, and leaves the loop (and the cache) as soon as it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from ray import serve
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from deployments import loading
from deployments.batching import BatchedModel
from serve_app.config import GeneratorConfig
from serve_app.protocol.generation import Delta, GenerationRequest

# Admission batches that may be in flight at once; they share the one decode loop.
CONCURRENT_BATCHES = 4


@dataclass
class _Sequence:
    request: GenerationRequest
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    rng: torch.Generator | None = None
    dropped: int = 0  # prompt tokens cut from the start to fit the context window
    delta: Delta | None = None  # this step's output
    abandoned: bool = False  # its caller went away: drop it at the next step


@dataclass
class _Admission:
    """One `@serve.batch` call: its sequences, and a queue of per-step outputs for them."""

    sequences: list[_Sequence]
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class _DecodeState:
    """Tensors of the sequences in flight, row k belonging to `sequences[k]`."""

    sequences: list[_Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # (rows, cached tokens): 0 where a row is left-padded
    positions: torch.Tensor  # (rows,) position of each row's last token
    logits: torch.Tensor  # (rows, vocab) next-token logits, not yet sampled


@serve.deployment(max_ongoing_requests=64)
class Generator(BatchedModel):
    """Chat generation with a KV cache and continuous batching of concurrent requests."""

    batched = "_generate_batch"

    def __init__(self, config: GeneratorConfig, cache_dir: Path) -> None:
        super().__init__()
        self.device = loading.pick_device(config)
        loading.set_threads(config.torch_threads)
        self.tokenizer = loading.load_tokenizer(config, cache_dir)
        self.counter = loading.TokenCounter(self.tokenizer)
        choice = loading.causal_lm_precision(config, cache_dir, self.device, self.tokenizer)
        self.precision = choice.precision
        self.model = loading.load_causal_lm(config, cache_dir, self.device, self.precision)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.context_tokens = getattr(self.model.config, "max_position_embeddings", 2048)
        self.state: _DecodeState | None = None
        self.waiting: list[_Admission] = []
        self.running: list[_Admission] = []
        self.loop_task: asyncio.Task | None = None
        self.info = {
            "role": "generation",
            "model": config.name,
            "source": config.model,
            "precision": self.precision,
            "precision_requested": config.precision,
            "precision_trials": [asdict(t) for t in choice.trials],
            "precision_measured": choice.measured,
            "device": self.device,
            "threads": torch.get_num_threads(),
            "context_tokens": self.context_tokens,
            "kv_cache": True,
        }
        warm = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        self._admit([self._sequence(warm), self._sequence(warm)])
        # Only plain growing caches can be stacked mid-decode; models with other cache layers
        # (sliding window, ...) admit new requests when the loop is empty instead.
        self.mergeable = all(type(layer) is DynamicLayer for layer in self.state.cache.layers)
        self.info["continuous_batching"] = self.mergeable
        while self.state is not None:
            self._step()
        self.loaded()

    def memory(self) -> dict[str, int]:
        return loading.memory_report(self.model, self.device)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer to `request`; non-empty deltas, the last with a finish_reason."""
        # The prompt is built here, per request, so one that cannot be never joins a batch.
        sequence = self._sequence(request)
        try:
            async for delta in self._generate_batch(sequence):
                if delta.text or delta.finish_reason:
                    yield delta
        finally:  # done, or the caller cancelled (deadline, disconnect): stop decoding for it
            sequence.abandoned = True

    async def choose(self, messages: list[dict[str, str]], options: list[str]) -> list[float]:
        """Constrained answering: the probability of each option as the assistant's whole
        reply to `messages` (softmax over the options' mean token log-probabilities), so the
        answer is always one of them. One forward pass over all options, off the event loop;
        it shares the model with the decode loop, not its batches."""
        return await asyncio.to_thread(self._choose, messages, options)

    @torch.inference_mode()
    def _choose(self, messages: list[dict[str, str]], options: list[str]) -> list[float]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        counter = self.counter
        prompt = counter([text], add_special_tokens=False)["input_ids"][0]
        answers = counter(options, add_special_tokens=False)["input_ids"]
        rows = [prompt + answer for answer in answers]
        batch = counter.pad(rows, self.device)
        token_logprobs = loading.tail_logprobs(self.model, batch, max(len(a) for a in answers))
        means = torch.stack([token_logprobs[k, -len(a) :].mean() for k, a in enumerate(answers)])
        return torch.softmax(means, dim=0).tolist()

    # Start-up values; reconfigure() applies the deployment's user_config before any request.
    @serve.batch(
        **GeneratorConfig().batching.serve_batch(), max_concurrent_batches=CONCURRENT_BATCHES
    )
    async def _generate_batch(self, sequences: list[_Sequence]):
        admission = _Admission(list(sequences))
        self.waiting.append(admission)
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.create_task(self._decode_loop())
        while (out := await admission.outputs.get()) is not None:
            if isinstance(out, BaseException):
                raise out
            yield out

    async def _decode_loop(self) -> None:
        """Admit waiting batches between steps; run steps until nothing is in flight."""
        try:
            while self.waiting or self.state is not None:
                admitted = self._take_admissions()
                if admitted:
                    rows = [s for a in admitted for s in a.sequences]
                    await asyncio.to_thread(self._admit, rows)
                    self.running += admitted
                # Each forward pass runs off the event loop, so requests keep arriving.
                await asyncio.to_thread(self._step)
                self._publish()
        except BaseException as exc:
            for admission in self.running + self.waiting:
                admission.outputs.put_nowait(exc)
            self.state, self.running, self.waiting = None, [], []
            raise

    def _take_admissions(self) -> list[_Admission]:
        """Waiting batches that fit beside the sequences in flight: at most `max_batch_size`
        sequences, and at most `max_batch_tokens` tokens of KV cache once all are done."""
        running = self.state.sequences if self.state else []
        in_flight, tokens = len(running), sum(_budget(s) for s in running)
        taken = []
        while self.waiting:
            more = self.waiting[0].sequences
            more_tokens = sum(_budget(s) for s in more)
            fits = (
                self.mergeable
                and in_flight + len(more) <= self.max_batch_size
                and tokens + more_tokens <= self.max_batch_tokens
            )
            if in_flight and not fits:
                break
            taken.append(self.waiting.pop(0))
            in_flight, tokens = in_flight + len(more), tokens + more_tokens
        self.record_batch(sum(len(a.sequences) for a in taken), in_flight, tokens)
        return taken

    def _publish(self) -> None:
        """Hand each running admission this step's outputs, one per request."""
        still = []
        for admission in self.running:
            out = [s.delta if s.delta is not None else StopIteration for s in admission.sequences]
            admission.outputs.put_nowait(out)
            if all(s.delta is None or s.delta.finish_reason for s in admission.sequences):
                admission.outputs.put_nowait(None)
            else:
                still.append(admission)
            for s in admission.sequences:
                if s.delta is not None and s.delta.finish_reason:
                    s.delta = None  # done: StopIteration from the next step on
        self.running = still

    def _sequence(self, request: GenerationRequest) -> _Sequence:
        text = self.tokenizer.apply_chat_template(
            request.messages, tokenize=False, add_generation_prompt=True
        )
        ids = self.counter([text], add_special_tokens=False)["input_ids"][0]
        # Keep the most recent context when a conversation outgrows the window.
        prompt = ids[-max(1, self.context_tokens - request.max_tokens) :]
        rng = None
        if request.seed is not None and request.temperature > 0:
            rng = torch.Generator(self.device).manual_seed(request.seed)
        return _Sequence(request=request, prompt=prompt, rng=rng, dropped=len(ids) - len(prompt))

    @torch.inference_mode()
    def _admit(self, sequences: list[_Sequence]) -> None:
        """Prefill `sequences` in one left-padded pass and merge them into the running state."""
        batch = self.tokenizer.pad(
            {"input_ids": [s.prompt for s in sequences]}, return_tensors="pt"
        ).to(self.device)
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
        new = _DecodeState(sequences, cache, mask, positions[:, -1], logits)
        self.state = new if self.state is None else _merge(self.state, new)

    @torch.inference_mode()
    def _step(self) -> None:
        """Sample one token per sequence, emit text, drop finished ones, run the next pass."""
        state = self.state
        assert state is not None
        tokens = _sample(state.logits, state.sequences)
        for sequence, token in zip(state.sequences, tokens.tolist(), strict=True):
            sequence.delta = self._advance(sequence, token)
        keep = [k for k, s in enumerate(state.sequences) if not s.delta.finish_reason]
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
            _trim_padding(state)
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(keep), 1)], dim=-1)
        state.positions = state.positions + 1
        state.logits = self.model(
            input_ids=tokens[:, None],
            attention_mask=state.mask,
            position_ids=state.positions[:, None],
            past_key_values=state.cache,
            use_cache=True,
        ).logits[:, -1]

    def _advance(self, sequence: _Sequence, token: int) -> Delta:
        """Take one token into `sequence`; return the text that is now safe to emit."""
        finish = None
        if sequence.abandoned:
            return Delta("", "cancelled", len(sequence.prompt), len(sequence.ids), sequence.dropped)
        if token in self.eos_ids:
            finish = "stop"
        else:
            sequence.ids.append(token)
        text = self.tokenizer.decode(sequence.ids, skip_special_tokens=True)
        stops = sequence.request.stop
        cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif finish is None and len(sequence.ids) >= sequence.request.max_tokens:
            finish = "length"
        end = len(text)
        if finish is None:
            # Hold back what could still become a stop string or an incomplete character.
            end -= max((len(s) - 1 for s in stops), default=0)
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        new = text[sequence.sent : max(end, sequence.sent)]
        sequence.sent += len(new)
        completion = len(sequence.ids) + (token in self.eos_ids)
        return Delta(new, finish, len(sequence.prompt), completion, sequence.dropped)


def _budget(sequence: _Sequence) -> int:
    """Cache tokens a sequence holds when it has used all of its `max_tokens`."""
    return len(sequence.prompt) + sequence.request.max_tokens


def _sample(logits: torch.Tensor, sequences: list[_Sequence]) -> torch.Tensor:
    """Greedy where temperature is 0, else temperature and nucleus (top_p) sampling per row;
    OpenAI's frequency and presence penalties first lower the logits of tokens already said."""
    logits = logits.float()
    for k, sequence in enumerate(sequences):
        request = sequence.request
        if sequence.ids and (request.frequency_penalty or request.presence_penalty):
            said = torch.tensor(sequence.ids, device=logits.device)
            counts = torch.bincount(said, minlength=logits.shape[-1])[: logits.shape[-1]]
            logits[k] -= (
                counts * request.frequency_penalty + (counts > 0) * request.presence_penalty
            )
    tokens = logits.argmax(-1)
    for k, sequence in enumerate(sequences):
        request = sequence.request
        if request.temperature <= 0:
            continue
        probs = torch.softmax(logits[k] / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > request.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        tokens[k] = torch.multinomial(probs, 1, generator=sequence.rng)[0]
    return tokens


def _merge(old: _DecodeState, new: _DecodeState) -> _DecodeState:
    """Stack two decode states, left-padding the shorter one's cache and mask."""
    length = max(old.mask.shape[1], new.mask.shape[1])
    for a, b in zip(old.cache.layers, new.cache.layers, strict=True):
        a.keys = torch.cat([_left_pad(a.keys, length, -2), _left_pad(b.keys, length, -2)])
        a.values = torch.cat([_left_pad(a.values, length, -2), _left_pad(b.values, length, -2)])
    return _DecodeState(
        sequences=old.sequences + new.sequences,
        cache=old.cache,
        mask=torch.cat([_left_pad(old.mask, length, -1), _left_pad(new.mask, length, -1)]),
        positions=torch.cat([old.positions, new.positions]),
        logits=torch.cat([old.logits, new.logits]),
    )


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)


def _trim_padding(state: _DecodeState) -> None:
    """Drop leading cache columns that are padding in every remaining row."""
    used = state.mask.any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start == 0:
        return
    state.mask = state.mask[:, start:]
    for layer in state.cache.layers:
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
