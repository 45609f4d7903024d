"""The llama.cpp engine: a GGUF model as it ships (no dequantization), decoding many sequences
at once through llama-cpp-python's low-level API. No Ray here.

One llama.cpp context holds every sequence. Each sequence in flight owns a *slot*: a llama.cpp
sequence id with a KV stream of its own (the cache is not unified), so one step is one
`llama_decode` of a batch with one token per slot, and a sequence that leaves frees its stream
with `llama_memory_seq_rm`. The arithmetic:

    n_seq_max = max_sequences + 1           (the extra slot keeps a prompt prefix, below)
    n_ctx     = n_seq_max * slot_tokens     (llama.cpp gives each stream n_ctx / n_seq_max)
    a sequence fits when len(prompt) + max_tokens <= slot_tokens (= `context_tokens`)

(slot_tokens rounded up to llama.cpp's 256 and capped at the model's training window), so a
slot never runs out of cache mid-answer, and `add` refuses (raises) a sequence when every slot
is taken or its budget is over a slot. The cache is allocated whole at start: for SmolLM2-135M
(30 layers, 3 KV heads of 64, f16) a token costs 23 KB, so 9 slots of 2048 take 425 MB. Streams
of their own rather than one unified cache: each token attends over its own sequence only, and
no sequence can take another's room.

Threads default to the cores this process may run on. llama.cpp's threads spin at every
barrier, so on cores shared with other busy processes fewer threads decode faster: give the
engine its share of the cores, not the machine's. Reading a prompt (prefill, and scoring rows)
runs on `prompt_threads` (default: `threads`), decode steps on `threads`: where cores sit idle
while prompts are read, more threads read them faster.

Prompt prefixes are reused across requests: RAG prompts share the template and the system
prompt. The spare slot keeps the KV of a recent prompt; a new sequence whose prompt shares at
least `PREFIX_REUSE` tokens with it gets a copy of that stream (`llama_memory_seq_cp`, then the
tail past the shared part removed) and prefills only the rest.

Sampling runs the project's own sampling on each sequence's row of logits, so an answer's
settings behave as in the transformers engine (docs/benchmarks/generation.md has the cost).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from deployments.engines.base import Sequence, advance
from deployments.engines.sampling import new_rng, sample_row
from serve_app.contracts import GenerationRequest

# The shortest shared prefix worth a stream copy; a shorter one is prefilled instead. Copying
# a 2048-token stream costs about what prefilling one token does (docs/benchmarks/generation.md),
# so even the chat template's own system prompt (~25 tokens) pays.
PREFIX_REUSE = 16
# llama.cpp's own log goes to this logger; at ERROR only failures reach stderr.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
_backend = threading.Lock()
_backend_ready = False


@dataclass
class _Slot:
    """A sequence's place in the context: its llama.cpp sequence id and where it stands."""

    seq_id: int
    rng: torch.Generator | None
    position: int = 0  # tokens of this sequence in its KV stream
    logits: np.ndarray | None = None  # (vocab,) next-token logits, not yet sampled
    text: bytearray = field(default_factory=bytearray)  # bytes of the generated tokens
    decoded: int = 0  # generated tokens already in `text`
    reused: int = 0  # prompt tokens taken from the prefix slot instead of prefilled
    next: int = 0  # the token sampled this step, decoded at the end of it


class LlamaCppEngine:
    """A GGUF causal LM on llama.cpp with continuous batching over a fixed number of slots."""

    name = "llama.cpp"
    joins_mid_decode = True

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_sequences: int = 8,
        slot_tokens: int = 2048,
        threads: int | None = None,
        prompt_threads: int | None = None,
        prefix_cache: bool = True,
        gpu_layers: int = 0,
        weights: dict[str, Any] | None = None,
        flash_attention: bool = False,
    ) -> None:
        """`weights`: how the GGUF file was chosen (deployments/engines/gguf.py), reported.

        `flash_attention` off by default: on CPU, llama.cpp's flash attention sums attention
        in half precision. It can decode a step sooner, but it moves answer tokens'
        log-probabilities by ~0.08 nats on average, where `precision: auto` keeps re-quantized
        weights only within 0.02 nats of mean KL, and a sequence's logits then depend on where
        its cache sits. docs/benchmarks/generation.md measures both (bench_generation's flash
        attention table)."""
        _init_backend()
        self.weights = weights or {}
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF model at {self.path}")
        self.threads = threads or len(os.sched_getaffinity(0))
        self.prompt_threads = prompt_threads or self.threads
        self.prefix_cache = prefix_cache
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        trained = llama_cpp.llama_model_n_ctx_train(self.model)
        # llama.cpp rounds each stream up to a multiple of 256 tokens.
        self.slot_tokens = min(_round_up(slot_tokens, 256), _round_up(trained, 256))
        self.max_sequences = max_sequences
        self.n_seq = max_sequences + 1
        self.prefix_slot = max_sequences  # the spare slot's sequence id
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.slot_tokens * self.n_seq
        params.n_batch = params.n_ubatch = min(self.slot_tokens, 512)
        params.n_seq_max = self.n_seq
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = False
        params.no_perf = True
        # Without flash attention a sequence's logits do not depend on where its cache sits
        # (alone, beside others, or copied from the prefix slot): greedy answers repeat exactly.
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attention
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.flash_attention = flash_attention
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context for {self.path}")
        self.n_batch = params.n_batch
        self.memory_handle = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.context_tokens = self.slot_tokens
        self.eos_ids = {
            t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)
        }
        eot = llama_cpp.llama_vocab_eot(self.vocab)
        self._end = [eot if eot >= 0 else llama_cpp.llama_vocab_eos(self.vocab)]
        self.template = _chat_template(self.model, self.vocab)
        self.pieces: dict[int, bytes] = {}
        # SentencePiece vocabularies spell a word's leading space into its token; transformers
        # drops it from the first token of an answer, and so does `_text`.
        self.strip_first = llama_cpp.llama_vocab_type(self.vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
        self.free = list(range(max_sequences))
        self.flight: list[Sequence] = []
        self.prefix: list[int] = []  # the prompt whose KV the spare slot holds
        self.stats = {"prefilled": 0, "reused": 0}
        self.warm_up()

    def close(self) -> None:
        """Free the context and the model (the engine is unusable after)."""
        if getattr(self, "ctx", None):
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the binding may be gone
            self.close()

    def warm_up(self) -> None:
        """One short answer through every path (prefill, step, leave), so the first request
        pays no first-call costs."""
        warm = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        self.add([self.sequence(warm) for _ in range(min(2, self.max_sequences))])
        while self.flight:
            self.step()
        self._forget_prefix()

    # What the deployment shows and sizes by.

    def info(self) -> dict[str, Any]:
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, desc, len(desc))
        return {
            "engine": self.name,
            "model_file": str(self.path),
            # The GGUF's own quantization, as llama.cpp describes the model ("llama 256M Q4_1").
            "precision": desc.value.decode(errors="replace").rsplit(" ", 1)[-1],
            "model_description": desc.value.decode(errors="replace"),
            **self.weights,
            "device": "cpu" if not llama_cpp.llama_supports_gpu_offload() else "cpu+gpu",
            "threads": self.threads,
            "flash_attention": self.flash_attention,
            "prompt_threads": self.prompt_threads,
            "context_tokens": self.context_tokens,
            "max_sequences": self.max_sequences,
            "kv_cache": True,
            "continuous_batching": True,
            "prefix_cache": self.prefix_cache,
            "prefix_tokens_reused": self.stats["reused"],
            "prompt_tokens_prefilled": self.stats["prefilled"],
            "llama_cpp_python": llama_cpp.__version__,
        }

    def memory(self) -> dict[str, int]:
        layers = llama_cpp.llama_model_n_layer(self.model)
        head_dim = llama_cpp.llama_model_n_embd(self.model) // llama_cpp.llama_model_n_head(
            self.model
        )
        per_token = layers * 2 * llama_cpp.llama_model_n_head_kv(self.model) * head_dim * 2
        return {
            "weights": int(llama_cpp.llama_model_size(self.model)),
            "kv_cache": per_token * self.slot_tokens * self.n_seq,  # f16 keys and values
        }

    # Prompts and text.

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self._tokenize(text, special=False) for text in texts]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self._tokenize(self.template(messages), special=True)

    @property
    def end_of_turn(self) -> list[int]:
        return list(self._end)

    def sequence(self, request: GenerationRequest) -> Sequence:
        ids = self.chat_prompt(request.messages)
        # Keep the most recent context when a conversation outgrows the slot.
        prompt = ids[-max(1, self.context_tokens - request.max_tokens) :]
        return Sequence(request=request, prompt=prompt, dropped=len(ids) - len(prompt))

    # Decoding.

    def in_flight(self) -> list[Sequence]:
        return list(self.flight)

    def add(self, sequences: list[Sequence]) -> None:
        if len(sequences) > len(self.free):
            raise RuntimeError(
                f"llama.cpp engine: {len(sequences)} sequences to add, "
                f"{len(self.free)} of {self.max_sequences} slots free"
            )
        for s in sequences:
            if s.budget > self.slot_tokens:
                raise ValueError(
                    f"a sequence needs {s.budget} tokens of cache (prompt and max_tokens); "
                    f"a slot holds {self.slot_tokens}"
                )
            if not s.prompt:
                raise ValueError("a sequence needs at least one prompt token")
        self.free.sort()  # lowest first: see _decode
        slots = [_Slot(self.free[k], new_rng(s.request, "cpu")) for k, s in enumerate(sequences)]
        try:
            starts = [
                self._reuse_prefix(s.prompt, slot) for s, slot in zip(sequences, slots, strict=True)
            ]
            rows = [
                (slot.seq_id, s.prompt[start:], start)
                for s, slot, start in zip(sequences, slots, starts, strict=True)
            ]
            logits = self._decode(rows)
        except BaseException:
            for slot in slots:
                llama_cpp.llama_memory_seq_rm(self.memory_handle, slot.seq_id, -1, -1)
            raise
        del self.free[: len(sequences)]
        for s, slot, row in zip(sequences, slots, logits, strict=True):
            slot.position, slot.logits = len(s.prompt), row
            s.engine = slot
            self.flight.append(s)
        self.stats["prefilled"] += sum(
            len(s.prompt) - slot.reused for s, slot in zip(sequences, slots, strict=True)
        )
        self.stats["reused"] += sum(slot.reused for slot in slots)
        if self.prefix_cache:
            self._keep_prefix(sequences)

    def step(self) -> None:
        self.sample()
        self.forward()

    def forward(self) -> None:
        for s in [s for s in self.flight if s.done]:
            self._leave(s)
        if not self.flight:
            return
        rows = [(s.engine.seq_id, [s.engine.next], s.engine.position) for s in self.flight]
        for s, row in zip(self.flight, self._decode(rows), strict=True):
            s.engine.position += 1
            s.engine.logits = row

    def sample(self) -> None:
        """Each sequence's next token and text; a sequence that fails here fails alone."""
        with _one_torch_thread():
            self._sample()

    def _sample(self) -> None:
        for s in self.flight:
            slot: _Slot = s.engine
            try:
                token = sample_row(torch.from_numpy(slot.logits), s.request, s.ids, slot.rng)
                s.delta = advance(
                    s, token, self.eos_ids, lambda ids, slot=slot: self._text(ids, slot)
                )
            except Exception as exc:
                token, s.error = 0, exc
            slot.logits = None
            slot.next = token

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self.memory_handle, True)
        self.flight, self.free, self.prefix = [], list(range(self.max_sequences)), []

    def logprobs(self, rows: list[list[int]], tails: list[int]) -> list[list[float]]:
        for row, tail in zip(rows, tails, strict=True):
            if not 0 < tail < len(row):
                raise ValueError(f"a row of {len(row)} tokens cannot score its last {tail}")
        out: list[list[float]] = []
        scored = self.logits(rows, [tail + 1 for tail in tails])
        for row, tail, row_logits in zip(rows, tails, scored, strict=True):
            scores = torch.log_softmax(torch.from_numpy(row_logits[:-1]), dim=-1)
            targets = torch.tensor(row[-tail:])
            out.append(scores.gather(-1, targets[:, None]).squeeze(-1).tolist())
        return out

    def logits(self, rows: list[list[int]], tails: list[int] | None = None) -> list[np.ndarray]:
        """Each row's next-token logits after each of its last `tails[k]` tokens (all of them
        by default), as a (tail, vocab) array. Rows go through the free slots, as many at a
        time as are free (the spare slot, and its prefix, when none is), and leave the cache
        when scored."""
        tails = tails or [len(row) for row in rows]
        for row, tail in zip(rows, tails, strict=True):
            if not 0 < tail <= len(row) or len(row) > self.slot_tokens:
                raise ValueError(
                    f"a row of {len(row)} tokens cannot score its last {tail} "
                    f"(a slot holds {self.slot_tokens})"
                )
        seq_ids = list(self.free)
        if not seq_ids:
            seq_ids = [self.prefix_slot]
            self._forget_prefix()
        out: list[np.ndarray] = []
        for first in range(0, len(rows), len(seq_ids)):
            group = rows[first : first + len(seq_ids)]
            spans = [(seq_ids[k], row, 0) for k, row in enumerate(group)]
            try:
                out += self._decode(spans, tails=tails[first : first + len(group)])
            finally:
                for seq_id, _, _ in spans:
                    llama_cpp.llama_memory_seq_rm(self.memory_handle, seq_id, -1, -1)
        return out

    # Internals.

    def _leave(self, sequence: Sequence) -> None:
        self.flight.remove(sequence)
        slot: _Slot = sequence.engine
        llama_cpp.llama_memory_seq_rm(self.memory_handle, slot.seq_id, -1, -1)
        self.free.append(slot.seq_id)

    def _reuse_prefix(self, prompt: list[int], slot: _Slot) -> int:
        """Copy the spare slot's KV into `slot` when it shares enough of `prompt`; return how
        many prompt tokens are then in the cache. The last prompt token is always prefilled:
        its logits are the first answer token's."""
        if not self.prefix_cache or not self.prefix:
            return 0
        shared = _common_prefix(self.prefix, prompt[:-1])
        if shared < PREFIX_REUSE:
            return 0
        llama_cpp.llama_memory_seq_cp(self.memory_handle, self.prefix_slot, slot.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_rm(self.memory_handle, slot.seq_id, shared, -1)
        slot.reused = shared
        return shared

    def _keep_prefix(self, sequences: list[Sequence]) -> None:
        """Keep the newest prompt in the spare slot, for the prompts after it: the last of
        `sequences` that brings at least `PREFIX_REUSE` tokens the kept one lacks (a prompt
        that copied nearly all of itself adds nothing worth a copy)."""
        for s in reversed(sequences):
            if len(s.prompt) - s.engine.reused >= PREFIX_REUSE:
                llama_cpp.llama_memory_seq_rm(self.memory_handle, self.prefix_slot, -1, -1)
                llama_cpp.llama_memory_seq_cp(
                    self.memory_handle, s.engine.seq_id, self.prefix_slot, -1, -1
                )
                self.prefix = list(s.prompt)
                return

    def _forget_prefix(self) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory_handle, self.prefix_slot, -1, -1)
        self.prefix = []

    def _decode(
        self, rows: list[tuple[int, list[int], int]], tails: list[int] | None = None
    ) -> list[np.ndarray]:
        """Run `rows` (seq_id, tokens, first position) through the model, in batches of at
        most n_batch tokens; return each row's logits for its last token, or for its last
        `tails[k]` tokens as a (tail, vocab) array.

        Rows go in by sequence id: with a stream per sequence, llama.cpp puts sequences in one
        micro-batch only while their ids run consecutively, so out of order (or with gaps) a
        step of 8 tokens ran as up to 8 forward passes."""
        wanted = tails or [1] * len(rows)
        order = sorted(range(len(rows)), key=lambda k: rows[k][0])
        flat = [
            (rows[k][0], token, rows[k][2] + i, i >= len(rows[k][1]) - wanted[k])
            for k in order
            for i, token in enumerate(rows[k][1])
        ]
        outputs: list[np.ndarray] = []
        batch = self.batch
        # llama.cpp runs a batch of more than one token on its batch threads: a prompt's.
        reading = len(flat) > len(rows)
        batch_threads = self.prompt_threads if reading else self.threads
        llama_cpp.llama_set_n_threads(self.ctx, self.threads, batch_threads)
        for first in range(0, len(flat), self.n_batch):
            chunk = flat[first : first + self.n_batch]
            for i, (seq_id, token, position, keep) in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = keep
            batch.n_tokens = len(chunk)
            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed ({status}) on {len(chunk)} tokens")
            kept = sum(1 for entry in chunk if entry[3])
            if kept:
                pointer = llama_cpp.llama_get_logits(self.ctx)
                outputs.append(np.ctypeslib.as_array(pointer, shape=(kept, self.n_vocab)).copy())
        every = np.concatenate(outputs) if outputs else np.empty((0, self.n_vocab), np.float32)
        result: list[np.ndarray] = [every[:0]] * len(rows)
        at = 0
        for k in order:
            result[k] = every[at] if tails is None else every[at : at + wanted[k]]
            at += wanted[k]
        return result

    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        data = text.encode()
        room = len(data) + 8
        buffer = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, room, False, special)
        if n < 0:  # more tokens than bytes cannot happen for byte-level vocabularies; be safe
            buffer = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, -n, False, special)
        return list(buffer[:n])

    def _piece(self, token: int) -> bytes:
        piece = self.pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -n, 0, False)
            piece = self.pieces[token] = buffer.raw[:n]
        return piece

    def _text(self, ids: list[int], slot: _Slot) -> str:
        """The text of `ids` (a sequence's generated tokens, growing by one per step): bytes
        of new tokens are appended, so each step decodes no token twice."""
        for k in range(slot.decoded, len(ids)):
            piece = self._piece(ids[k])
            slot.text += piece.removeprefix(b" ") if k == 0 and self.strip_first else piece
        slot.decoded = len(ids)
        return slot.text.decode("utf-8", errors="replace")


def _init_backend() -> None:
    global _backend_ready
    with _backend:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


@contextlib.contextmanager
def _one_torch_thread():
    """Torch's intra-op pool at one thread while sampling: a row of logits splits across
    threads, and on busy shared cores the spinning pool made a greedy pick ~10 ms on average
    instead of ~0.05 ms (docs/benchmarks/generation.md). Nothing else here uses torch."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _chat_template(model, vocab):
    """The GGUF's own chat template (`tokenizer.chat_template`), rendered with jinja2 in a
    sandbox the way transformers renders it, ready for the assistant's turn."""
    source = llama_cpp.llama_model_chat_template(model, None)
    if not source:
        raise ValueError("the GGUF has no chat template (tokenizer.chat_template)")

    def token_text(token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(vocab, token).decode(errors="replace")

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda f: datetime.now().strftime(f)
    template = environment.from_string(source.decode())
    bos, eos = (
        token_text(llama_cpp.llama_vocab_bos(vocab)),
        token_text(llama_cpp.llama_vocab_eos(vocab)),
    )

    def render(messages: list[dict[str, str]]) -> str:
        return template.render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
        )

    return render
