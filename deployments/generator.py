"""The Generator deployment: chat answers, token by token, from a generation engine
(deployments/engines/: transformers or llama.cpp, behind one contract in base.py).

Requests reach the engine through `@serve.batch`: requests arriving together are prefilled
together. Each admitted batch then joins one running decode loop, which takes one engine step
for every sequence in flight. New batches join the loop between steps (continuous batching),
so a request arriving while others decode does not wait for them to finish. Each sequence
keeps its own sampling settings, stop strings and token budget, and leaves the loop (and the
cache) as soon as it is done.

One request cannot fail another's. Anything that raises for one sequence inside a step
(sampling, detokenizing, stop handling) ends that sequence alone, with the error delivered to
its own caller; a prefill that fails fails only the requests it was prefilling. Only a failed
step (a forward pass that holds every sequence) fails all of them, and the loop then starts
afresh for the requests that arrive next.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve

from deployments.batching import BatchedModel
from deployments.engines import choice, load_engine
from deployments.engines.base import GenerationEngine, Sequence
from deployments.lane import Lane
from deployments.streaming import merged
from serve_app.config import GeneratorConfig
from serve_app.contracts import Choice, Delta, GenerationRequest
from serve_app.metrics import DecodeSteps

# Admission batches that may be in flight at once; they share the one decode loop. A batch
# stays in flight until its last sequence ends, so with fewer batches than decode slots a
# request can wait a whole answer while slots are free. As many as the default slots
# (`max_batch_size` 8), so that with no batch wait (each request its own batch, joining the
# loop between steps) every slot can fill: in two bench_generation runs against 4 batches and
# a 20 ms wait, one stream's first token came after 125 ms against 156 (llama-server: 70 and
# 74), eight streams' after 584 ms against 705, at 0.85 of llama-server's tokens/s against
# 0.79 (serve_config.yaml).
CONCURRENT_BATCHES = 8
# Constrained choices (Generator.choose) waiting for their lane before new ones are refused.
CHOICE_QUEUE = 64
logger = logging.getLogger("ray.serve")


@dataclass
class _Admission:
    """One `@serve.batch` call: its sequences, and a queue of per-step outputs for them."""

    sequences: list[Sequence]
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)


@serve.deployment(max_ongoing_requests=64)
class Generator(BatchedModel):
    """Chat generation with continuous batching of concurrent requests."""

    batched = ("_generate_batch",)

    def __init__(self, config: GeneratorConfig, cache_dir: Path, answers: str = "all") -> None:
        """`answers`: what this deployment serves (engines.ANSWERS), which `engine: auto`
        weighs: every route, or chat alone beside a Generator of RAG's own."""
        super().__init__(config.batching)
        self.stream_interval_s = config.stream_interval_ms / 1000
        engine, chosen = load_engine(config, cache_dir, answers)
        self._drive(engine)
        self.info.update(
            **chosen.report(config.engine),
            role="generation",
            model=config.name,
            source=config.model,
            precision_requested=config.precision,
        )
        self.loaded()

    def model_info(self) -> dict[str, object]:
        """The engine's report (precision, device, capabilities, its counters), then the
        deployment's: batching, memory, executed batches."""
        return {**self.engine.info(), **super().model_info()}

    def _drive(self, engine: GenerationEngine) -> None:
        """Take `engine` (loaded and warm), with an empty decode loop."""
        self.engine = engine
        self.waiting: list[_Admission] = []
        self.running: list[_Admission] = []
        self.loop_task: asyncio.Task | None = None
        self.steps = DecodeSteps(deployment=self.deployment)  # tokens per step, TPOT

    def memory(self) -> dict[str, int]:
        return self.engine.memory()

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text, without special tokens: what RAG fits its sources by."""
        ids = await asyncio.to_thread(self.engine.tokenize, texts)
        return [len(row) for row in ids]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer to `request`; non-empty deltas, the last with a finish_reason."""
        # The prompt is built here, per request, so one that cannot be never joins a batch;
        # in a thread, as templating and tokenizing a long conversation takes a while.
        sequence = await asyncio.to_thread(self.engine.sequence, request)
        try:
            async with aclosing(merged(self._deltas(sequence), self.stream_interval_s)) as out:
                async for delta in out:
                    yield delta
        finally:  # done, or the caller cancelled (deadline, disconnect): stop decoding for it
            sequence.abandoned = True

    async def _deltas(self, sequence: Sequence) -> AsyncIterator[Delta]:
        async for delta in self._generate_batch(sequence):
            if isinstance(delta, Exception):  # this sequence alone failed in a step
                raise delta
            if delta.text or delta.finish_reason:
                yield delta

    async def choose(
        self, messages: list[dict[str, str]], options: list[str], max_prompt_tokens: int
    ) -> Choice:
        """Constrained answering (deployments/engines/choice.py): the probability of each
        option as the assistant's whole reply, so the answer is always one of them. On a lane
        of its own with a bounded queue: choices never take the threads the decode loop's
        forward passes run on, and past `CHOICE_QUEUE` waiting calls the answer is `busy`."""
        if not hasattr(self, "choice_lane"):  # on first use: most replicas never choose
            self.choice_lane = Lane(CHOICE_QUEUE, "choose")
        if self.choice_lane.full():
            return Choice(None, "busy")
        return await self.choice_lane.run(self._choose, messages, options, max_prompt_tokens)

    def _choose(
        self, messages: list[dict[str, str]], options: list[str], max_prompt_tokens: int
    ) -> Choice:
        return choice.choose(self.engine, messages, options, max_prompt_tokens)

    # Start-up values only: __init__ applies the args' batching, reconfigure the user_config.
    @serve.batch(
        **GeneratorConfig().batching.serve_batch(), max_concurrent_batches=CONCURRENT_BATCHES
    )
    async def _generate_batch(self, sequences: list[Sequence]):
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

        A step that raises (its forward pass holds every sequence in flight) fails the
        admissions in flight, and the engine starts empty again, so the waiting requests and
        those arriving later are served."""
        try:
            while self.waiting or self.engine.in_flight():
                try:
                    await self._turn()
                except Exception as exc:
                    logger.exception("Generator: a decode step failed its sequences")
                    self._fail(self.running, exc)
                    self.engine.reset()
                    self.running = []
        except BaseException as exc:  # cancelled (the replica is stopping): fail everyone
            self._fail(self.running + self.waiting, exc)
            self.engine.reset()
            self.running, self.waiting = [], []
            raise

    async def _turn(self) -> None:
        """One turn of the loop: admit what fits, then one step for every sequence."""
        admitted = self._take_admissions()
        if admitted:
            await self._join(admitted)
        if stepping := self.engine.in_flight():
            # Sampling and each forward pass run off the event loop, so requests keep
            # arriving. The tokens go out before the next pass: each one a pass sooner.
            await asyncio.to_thread(self.engine.sample)
            ended = self._publish()
            await asyncio.to_thread(self.engine.forward)
            self.steps.stepped(stepping)
            for s in ended:  # they have left the engine: StopIteration from the next step on
                s.delta, s.error = None, None

    async def _join(self, admitted: list[_Admission]) -> None:
        """Prefill `admitted` and put them in flight. A prefill that raises is tried again
        batch by batch, and only a batch that fails alone fails: the sequences in flight and
        the other batches carry on."""
        rows = [s for a in admitted for s in a.sequences]
        try:
            await asyncio.to_thread(self.engine.add, rows)
        except Exception as exc:
            if len(admitted) > 1:
                for admission in admitted:
                    await self._join([admission])
                return
            logger.exception("Generator: a prefill of %d sequences failed", len(rows))
            self._fail(admitted, exc)
            return
        self.running += admitted

    @staticmethod
    def _fail(admissions: list[_Admission], exc: BaseException) -> None:
        for admission in admissions:
            admission.outputs.put_nowait(exc)

    def _take_admissions(self) -> list[_Admission]:
        """Waiting batches that fit beside the sequences in flight: at most `max_batch_size`
        sequences (and the engine's own bound), and at most `max_batch_tokens` tokens of
        cache once all are done."""
        running = self.engine.in_flight()
        in_flight, tokens = len(running), sum(s.budget for s in running)
        most = self.max_batch_size
        if self.engine.max_sequences:
            most = min(most, self.engine.max_sequences)
        taken = []
        while self.waiting:
            more = self.waiting[0].sequences
            more_tokens = sum(s.budget for s in more)
            fits = (
                self.engine.joins_mid_decode
                and in_flight + len(more) <= most
                and tokens + more_tokens <= self.max_batch_tokens
            )
            if in_flight and not fits:
                break
            taken.append(self.waiting.pop(0))
            in_flight, tokens = in_flight + len(more), tokens + more_tokens
        self.record_batch(sum(len(a.sequences) for a in taken), in_flight, tokens)
        return taken

    def _publish(self) -> list[Sequence]:
        """Hand each running admission this step's outputs, one per request; the sequences
        that ended in this step."""
        still, ended = [], []
        for admission in self.running:
            out = [_output(s) for s in admission.sequences]
            admission.outputs.put_nowait(out)
            if all(s.delta is None or s.done for s in admission.sequences):
                admission.outputs.put_nowait(None)
            else:
                still.append(admission)
            ended += [s for s in admission.sequences if s.done]
        self.running = still
        return ended


def _output(sequence: Sequence) -> Delta | Exception | type[StopIteration]:
    """What a sequence's caller gets for this step: its delta, its error, or the end."""
    if sequence.error is not None:
        return sequence.error
    return sequence.delta if sequence.delta is not None else StopIteration
