"""The generation model: a transformers causal LM answering chat messages, token by token.

Requests reach the model through `@serve.batch`: requests arriving together are prefilled
together (one left-padded forward pass). Each admitted batch then joins one running decode
loop, which takes one forward pass per step for every sequence in flight, with a KV cache.
New batches join the loop between steps (continuous batching), so a request arriving while
others decode does not wait for them to finish. Each sequence keeps its own sampling settings,
stop strings and token budget, and leaves the loop (and the cache) as soon as it is done.

One request cannot fail another's. Sampling runs on sanitized float32 logits, so every value
the API accepts samples a token. Anything else that raises for one sequence inside a step
(sampling, detokenizing, stop handling) ends that sequence alone, with the error delivered to
its own caller; a prefill that fails fails only the requests it was prefilling. Only a failed
decode forward pass, which holds every sequence, fails all of them, and the loop then starts
afresh for the requests that arrive next.
"""

from __future__ import annotations

import asyncio
import logging
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
from deployments.lane import Lane
from serve_app.config import GeneratorConfig
from serve_app.contracts import Choice, Delta, GenerationRequest

# Admission batches that may be in flight at once; they share the one decode loop.
CONCURRENT_BATCHES = 4
# Constrained choices (Generator.choose) waiting for their lane before new ones are refused.
CHOICE_QUEUE = 64
# Below this temperature sampling is greedy: a logit gap of 0.05 between the best two tokens
# already leaves the runner-up e^-50 of the mass, and dividing by much smaller values overflows
# float32 (1e-45 is a valid temperature by the API's bounds).
GREEDY_BELOW = 1e-3
# Logits are clamped to +-LOGIT_BOUND before sampling (real ones are tens at most), so that
# logits / temperature stays finite for every temperature at or above GREEDY_BELOW.
LOGIT_BOUND = 1e4
logger = logging.getLogger("ray.serve")


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
    error: Exception | None = None  # what failed it this step: its caller gets it, it leaves

    @property
    def done(self) -> bool:
        return self.error is not None or bool(self.delta and self.delta.finish_reason)


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

    batched = ("_generate_batch",)

    def __init__(self, config: GeneratorConfig, cache_dir: Path) -> None:
        super().__init__()
        self.device = loading.pick_device(config)
        loading.set_threads(config.torch_threads)
        tokenizer = loading.load_tokenizer(config, cache_dir)
        choice = loading.causal_lm_precision(config, cache_dir, self.device, tokenizer)
        self.precision = choice.precision
        model = loading.load_causal_lm(config, cache_dir, self.device, self.precision)
        self._bind(tokenizer, model)
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
            "continuous_batching": self.mergeable,
        }
        self.loaded()

    def _bind(self, tokenizer, model) -> None:
        """Take `model` and its (left-padding) tokenizer, with an empty decode loop, and warm
        them up with a batch of two."""
        self.tokenizer, self.model = tokenizer, model
        self.counter = loading.TokenCounter(tokenizer)
        eos = model.generation_config.eos_token_id
        self.eos_ids = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.context_tokens = getattr(model.config, "max_position_embeddings", 2048)
        self.state: _DecodeState | None = None
        self.waiting: list[_Admission] = []
        self.running: list[_Admission] = []
        self.loop_task: asyncio.Task | None = None
        warm = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        self._admit([self._sequence(warm), self._sequence(warm)])
        # Only plain growing caches can be stacked mid-decode; models with other cache layers
        # (sliding window, ...) admit new requests when the loop is empty instead.
        self.mergeable = all(type(layer) is DynamicLayer for layer in self.state.cache.layers)
        while self.state is not None:
            self._step()

    def memory(self) -> dict[str, int]:
        return loading.memory_report(self.model, self.device)

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text, without special tokens: what RAG fits its sources by."""
        ids = await asyncio.to_thread(self.counter, texts, add_special_tokens=False)
        return [len(row) for row in ids["input_ids"]]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer to `request`; non-empty deltas, the last with a finish_reason."""
        # The prompt is built here, per request, so one that cannot be never joins a batch;
        # in a thread, as templating and tokenizing a long conversation takes a while.
        sequence = await asyncio.to_thread(self._sequence, request)
        try:
            async for delta in self._generate_batch(sequence):
                if isinstance(delta, Exception):  # this sequence alone failed in a step
                    raise delta
                if delta.text or delta.finish_reason:
                    yield delta
        finally:  # done, or the caller cancelled (deadline, disconnect): stop decoding for it
            sequence.abandoned = True

    async def choose(
        self, messages: list[dict[str, str]], options: list[str], max_prompt_tokens: int
    ) -> Choice:
        """Constrained answering: the probability of each option as the assistant's whole
        reply to `messages` (softmax over the log-probabilities of the option's tokens and the
        end of the turn), so the answer is always one of them. One forward pass over all
        options, on a lane of its own with a bounded queue: choices never take the threads the
        decode loop's forward passes run on, and past `CHOICE_QUEUE` waiting calls the answer
        is `busy`. A prompt with its longest option over `max_prompt_tokens` is not run."""
        if not hasattr(self, "choice_lane"):  # on first use: most replicas never choose
            self.choice_lane = Lane(CHOICE_QUEUE, "choose")
        if self.choice_lane.full():
            return Choice(None, "busy")
        return await self.choice_lane.run(self._choose, messages, options, max_prompt_tokens)

    @torch.inference_mode()
    def _choose(
        self, messages: list[dict[str, str]], options: list[str], max_prompt_tokens: int
    ) -> Choice:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        counter = self.counter
        prompt = counter([text], add_special_tokens=False)["input_ids"][0]
        # The end of the turn makes each option the whole reply: without it, an option that
        # begins another ("bug", "bug report") would be scored as that one's start.
        end = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        answers = [a + end for a in counter(options, add_special_tokens=False)["input_ids"]]
        longest = max(len(a) for a in answers)
        if len(prompt) + longest > max_prompt_tokens:
            return Choice(None, "prompt_too_long")
        batch = counter.pad([prompt + answer for answer in answers], self.device)
        token_logprobs = loading.tail_logprobs(self.model, batch, longest)
        # The reply's log-probability (a sum): a mean would favour options whose later tokens
        # follow from their first, whatever the text says.
        totals = torch.stack([token_logprobs[k, -len(a) :].sum() for k, a in enumerate(answers)])
        return Choice(torch.softmax(totals, dim=0).tolist())

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
        """Admit waiting batches between steps; run steps until nothing is in flight.

        A decode step that raises (its forward pass holds every row in flight) fails the
        admissions in flight, and the state starts empty again, so the waiting requests and
        those arriving later are served."""
        try:
            while self.waiting or self.state is not None:
                try:
                    await self._turn()
                except Exception as exc:
                    logger.exception("Generator: a decode step failed its sequences")
                    self._fail(self.running, exc)
                    self.state, self.running = None, []
        except BaseException as exc:  # cancelled (the replica is stopping): fail everyone
            self._fail(self.running + self.waiting, exc)
            self.state, self.running, self.waiting = None, [], []
            raise

    async def _turn(self) -> None:
        """One turn of the loop: admit what fits, then one step for every sequence."""
        admitted = self._take_admissions()
        if admitted:
            await self._join(admitted)
        if self.state is not None:
            # Each forward pass runs off the event loop, so requests keep arriving.
            await asyncio.to_thread(self._step)
            self._publish()

    async def _join(self, admitted: list[_Admission]) -> None:
        """Prefill `admitted` and merge them into the running state. A prefill that raises
        is tried again batch by batch, and only a batch that fails alone fails: the sequences
        in flight and the other batches carry on."""
        rows = [s for a in admitted for s in a.sequences]
        try:
            new = await asyncio.to_thread(self._prefill, rows)
        except Exception as exc:
            if len(admitted) > 1:
                for admission in admitted:
                    await self._join([admission])
                return
            logger.exception("Generator: a prefill of %d sequences failed", len(rows))
            self._fail(admitted, exc)
            return
        self.running += admitted
        await asyncio.to_thread(self._merge_in, new)

    @staticmethod
    def _fail(admissions: list[_Admission], exc: BaseException) -> None:
        for admission in admissions:
            admission.outputs.put_nowait(exc)

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
            out = [_output(s) for s in admission.sequences]
            admission.outputs.put_nowait(out)
            if all(s.delta is None or s.done for s in admission.sequences):
                admission.outputs.put_nowait(None)
            else:
                still.append(admission)
            for s in admission.sequences:
                if s.done:
                    s.delta, s.error = None, None  # ended: StopIteration from the next step on
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

    def _admit(self, sequences: list[_Sequence]) -> None:
        """Prefill `sequences` in one left-padded pass and merge them into the running state."""
        self._merge_in(self._prefill(sequences))

    def _merge_in(self, new: _DecodeState) -> None:
        self.state = new if self.state is None else _merge(self.state, new)

    @torch.inference_mode()
    def _prefill(self, sequences: list[_Sequence]) -> _DecodeState:
        """The decode state of `sequences` alone, after one left-padded pass over their prompts."""
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
        return _DecodeState(sequences, cache, mask, positions[:, -1], logits)

    @torch.inference_mode()
    def _step(self) -> None:
        """Sample one token per sequence, emit text, drop finished ones, run the next pass.

        A sequence whose sampling or advancing raises takes the error as its output and
        leaves; the others go on."""
        state = self.state
        assert state is not None
        logits = state.logits.float()
        chosen = []
        for k, sequence in enumerate(state.sequences):
            try:
                token = _sample_row(logits[k], sequence)
                sequence.delta = self._advance(sequence, token)
            except Exception as exc:
                logger.warning("Generator: a sequence failed in a decode step (%r)", exc)
                token, sequence.error = 0, exc
            chosen.append(token)
        tokens = torch.tensor(chosen, device=state.logits.device)
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


def _output(sequence: _Sequence) -> Delta | Exception | type[StopIteration]:
    """What a sequence's caller gets for this step: its delta, its error, or the end."""
    if sequence.error is not None:
        return sequence.error
    return sequence.delta if sequence.delta is not None else StopIteration


def _sample_row(logits: torch.Tensor, sequence: _Sequence) -> int:
    """The next token of one sequence from its float32 `logits` (vocab,): greedy below
    GREEDY_BELOW, else temperature and nucleus (top_p) sampling; OpenAI's frequency and
    presence penalties first lower the logits of tokens already said.

    Every value the API accepts gives a token: logits are made finite and bounded first
    (NaN to the bottom, +-inf and outliers clamped), probabilities come from a log-softmax,
    and a row whose probabilities are still not usable falls back to its argmax."""
    request = sequence.request
    if sequence.ids and (request.frequency_penalty or request.presence_penalty):
        said = torch.tensor(sequence.ids, device=logits.device)
        counts = torch.bincount(said, minlength=logits.shape[-1])[: logits.shape[-1]]
        logits = logits - (
            counts * request.frequency_penalty + (counts > 0) * request.presence_penalty
        )
    # A new tensor: the bans below never touch the batch's logits.
    logits = logits.nan_to_num(nan=-LOGIT_BOUND).clamp(-LOGIT_BOUND, LOGIT_BOUND)
    if banned := _repeating(sequence.ids, request.no_repeat_ngram):
        logits[list(banned)] = -LOGIT_BOUND
    if request.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.log_softmax(logits / request.temperature, dim=-1).exp()
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > request.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    if not (torch.isfinite(probs).all() and probs.sum() > 0):
        return int(logits.argmax())
    return int(torch.multinomial(probs, 1, generator=sequence.rng))


def _repeating(ids: list[int], n: int) -> set[int]:
    """Tokens that would make the last n-1 tokens of `ids` into an n-gram `ids` already holds."""
    if n < 1 or len(ids) < n - 1:
        return set()
    if n == 1:
        return set(ids)
    tail = ids[len(ids) - n + 1 :]
    return {ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i : i + n - 1] == tail}


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
