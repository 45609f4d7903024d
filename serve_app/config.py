"""Every setting of the application, as typed models validated once.

`serve_config.yaml` `applications[].args` become an `AppConfig` in `build_app`; environment
variables (prefix `RAG_`, nested with `__`) are read here and nowhere else. Each deployment
receives its own section, already resolved for the cluster it runs on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# auto: the fastest precision that passes an accuracy check here (deployments/engines/precision.py).
# int8: torch dynamic quantization of Linear layers, per channel (CPU). bnb-*: bitsandbytes (CUDA).
Precision = Literal["auto", "fp32", "fp16", "bf16", "int8", "bnb-int8", "bnb-nf4"]

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_GENERATION_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


S = TypeVar("S", bound=BaseModel)


def overlay(defaults: S, user_config: Mapping[str, Any] | None) -> S:
    """The one live-config rule: `user_config` laid over `defaults` field by field, nested
    sections and dicts (route limits) included, then validated as the defaults' type.

    Every deployment applies its `user_config` this way, in `__init__` (with `{}` when Serve
    gives it none) and in `reconfigure`, over the defaults its `args` carry; so an omitted
    field keeps the value `args` set, never a code constant."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, Mapping):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    return type(defaults).model_validate(merge(defaults.model_dump(), dict(user_config or {})))


class Batching(Section):
    """Dynamic batching of one deployment; sent as `user_config`, so it changes live."""

    max_batch_size: int = Field(ge=1, le=4096, description="Items (sentences, pairs, sequences).")
    max_batch_tokens: int = Field(
        default=8192, ge=1, le=10_000_000, description="Tokens a batch holds, all items together."
    )
    batch_wait_timeout_s: float = Field(ge=0.0, le=10.0)

    def serve_batch(self) -> dict[str, float]:
        """The arguments `@serve.batch` takes (the token bound is applied by the deployment)."""
        return self.model_dump(include={"max_batch_size", "batch_wait_timeout_s"})


class ModelLive(Batching):
    """A model deployment's `user_config`: its batching and, for the Embedder, a `model` or
    `precision` to switch to live (None: the one in `args`)."""

    model: str | None = None
    precision: Precision | None = None


class ModelDeployment(Section):
    """What every model deployment shares: which model, where it runs, how it batches."""

    model: str = Field(description="Hub id or local path. Ids that a package bundles load offline.")
    served_name: str | None = Field(
        default=None, description="Name in /v1/models and responses; the model's last segment."
    )
    precision: Precision = "auto"
    num_gpus: float = Field(default=0.0, ge=0.0, le=8.0, description="GPU share when GPUs exist.")
    # A scheduling share, not a limit (threads are): at 0.2 / 0.2 / 0.4, two replicas of
    # each model and the rest of the graph fit on 2 cores.
    num_cpus: float = Field(default=0.4, gt=0.0, le=64.0)
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources per replica: pins it to nodes started with them.",
    )
    threads: int | None = Field(
        default=None, ge=1, le=256, description="Torch intra-op threads; default max(1, num_cpus)."
    )
    # The default user_config. The serve config's `deployments[].user_config` overrides it and
    # changes running replicas in place; a change to `args` restarts them.
    batching: Batching

    @property
    def name(self) -> str:
        return self.served_name or self.model.rstrip("/").rsplit("/", 1)[-1]

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, round(self.num_cpus))


class EmbedderConfig(ModelDeployment):
    model: str = DEFAULT_EMBEDDING_MODEL
    num_gpus: float = Field(default=0.25, ge=0.0, le=8.0)
    num_cpus: float = Field(default=0.2, gt=0.0, le=64.0)
    batching: Batching = Batching(
        max_batch_size=64, max_batch_tokens=8192, batch_wait_timeout_s=0.02
    )


class RerankerConfig(ModelDeployment):
    backend: Literal["query-likelihood", "cross-encoder"] = Field(
        default="query-likelihood",
        description="query-likelihood: mean log P(query | passage) under a causal LM. "
        "cross-encoder: a sentence-transformers CrossEncoder.",
    )
    model: str = DEFAULT_GENERATION_MODEL
    served_name: str | None = "query-likelihood-smollm2-135m"
    num_gpus: float = Field(default=0.25, ge=0.0, le=8.0)
    num_cpus: float = Field(default=0.2, gt=0.0, le=64.0)
    max_passage_tokens: int = Field(default=256, ge=8, le=8192)
    max_query_tokens: int = Field(default=64, ge=1, le=1024)
    batching: Batching = Batching(
        max_batch_size=64, max_batch_tokens=12288, batch_wait_timeout_s=0.01
    )


class GeneratorConfig(ModelDeployment):
    engine: Literal["auto", "transformers", "llama.cpp", "vllm"] = Field(
        default="auto",
        description="What decodes: transformers (any causal LM), llama.cpp (a GGUF, needs "
        "llama-cpp-python), vllm (CUDA, needs the vllm extra); auto measures those that can "
        "run the model here, once per machine, and keeps the one whose typical answers come "
        "soonest (deployments/engines/__init__.py).",
    )
    # In-process, llama.cpp reads a 1,000-token RAG prompt at 145 tokens/s on one thread and
    # 211 on two (2 cores, q8_0, AMX Xeon). Served on those 2 cores, two prompt threads halved
    # chat at 4 streams (64 -> 27-34 tokens/s; bench_generation), likely by taking the core
    # the proxy and ingress stream on.
    prompt_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="llama.cpp threads reading a prompt; default `threads`. More pays where "
        "cores are idle while prompts are read (RAG on a node of its own).",
    )
    model: str = DEFAULT_GENERATION_MODEL
    num_gpus: float = Field(default=0.5, ge=0.0, le=8.0)
    max_new_tokens: int = Field(default=512, ge=1, le=32768, description="Cap on max_tokens.")
    default_temperature: float = Field(
        default=0.0, ge=0.0, le=2.0, description="Used when a request sets none; 0 is greedy."
    )
    # 0 by default: on 2 CPU cores a streamed token costs the Ingress 1.7-3.1 ms of CPU against
    # 15-32 ms in the Generator (bench_generation's CPU-per-token table, docs/benchmarks/
    # generation.md), and 50 ms changed nothing measurable at 1 or 8 streams in an ad hoc
    # profile (deployments/streaming.py). Worth setting where decoding outruns message handling
    # (GPUs).
    stream_interval_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="After an answer's first text, at most one streamed message per interval: "
        "tokens decoded meanwhile go out together (deployments/streaming.py). 0: one per step.",
    )
    # Tokens: KV cache of every sequence in flight at its full max_tokens.
    # No batch wait: each request joins the running decode between steps (serve_config.yaml).
    batching: Batching = Batching(
        max_batch_size=8, max_batch_tokens=16384, batch_wait_timeout_s=0.0
    )


class StoreConfig(Section):
    """The document store: an external PostgreSQL with pgvector, or an embedded one."""

    # repr=False: a URL may hold a password, and configs end up in logs and tracebacks.
    database_url: str | None = Field(
        default=None,
        repr=False,
        description="Set by DATABASE_URL. None: the embedded server in data_dir.",
    )
    data_dir: Path = Field(default=Path("data/pgdata"), description="The embedded server's data.")
    # 1GB, not PostgreSQL's 128MB: an HNSW index must stay in shared buffers to be fast, and
    # the vectors of 100k 384-d chunks alone take 154 MB (100k x 384 x 4 bytes). With it,
    # hybrid search at 100k chunks measured 11.5 ms p50 (docs/benchmarks/retrieval.md). Memory
    # is taken as the data fills it.
    shared_buffers: str = Field(
        default="1GB",
        pattern=r"^[1-9][0-9]*(kB|MB|GB)$",
        description="The embedded server's shared_buffers (read when it starts).",
    )
    pool_size: int = Field(default=4, ge=1, le=64, description="Connections per route replica.")
    hnsw_m: int = Field(default=16, ge=2, le=100)
    hnsw_ef_construction: int = Field(default=64, ge=4, le=1000)
    # 80: recall@10 1.000 against exact search at 1.2 ms p50 on the man-page set (6k chunks),
    # 7.4 ms p50 at 100k chunks (docs/benchmarks/retrieval.md).
    ef_search: int = Field(default=80, ge=1, le=1000, description="Default HNSW candidates.")
    timeout_s: float = Field(
        default=3.0, gt=0.0, le=300.0, description="Wait for a connection; then 503."
    )


SearchMode = Literal["dense", "keyword", "hybrid"]
# PostgreSQL's text-search configurations are lowercase identifiers (simple, english, ...).
TEXT_SEARCH_CONFIG_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"


class RetrievalConfig(Section):
    """How search and RAG find chunks when a request does not say (docs/benchmarks/retrieval.md)."""

    mode: SearchMode = Field(
        default="hybrid",
        description="dense: vectors; keyword: PostgreSQL full-text; hybrid: both, fused by rank.",
    )
    # 5, not the usual 60: with 40 candidates a side and 10 answers, a small k lets the top of
    # either list lead; on both labelled sets it measured at least as good as 20 or 60 on
    # recall@1, recall@10 and MRR@10 (docs/benchmarks/retrieval.md, the fusion grid).
    rrf_k: int = Field(default=5, ge=1, le=10_000, description="Reciprocal rank fusion's k.")
    candidates: int = Field(
        default=40, ge=1, le=1000, description="Hybrid: chunks taken from each side to fuse."
    )
    # english: stemming and English stop words measured better than simple on recall@1 on both
    # labelled sets, keyword and hybrid alike (docs/benchmarks/retrieval.md). Korean, Chinese
    # and Japanese keep their character bigrams under any configuration.
    text_search_config: str = Field(
        default="english",
        pattern=TEXT_SEARCH_CONFIG_PATTERN,
        description="Keyword search's configuration for a new collection whose first ingest "
        "names none (`simple`: every word as written, for text in other languages).",
    )


class Chunking(Section):
    max_tokens: int = Field(default=200, ge=16, le=8192, description="Embedder tokens a chunk.")
    overlap: int = Field(default=32, ge=0, le=4096)

    @model_validator(mode="after")
    def _overlap_smaller(self) -> Chunking:
        if self.overlap >= self.max_tokens:
            raise ValueError("overlap must be smaller than max_tokens")
        return self


class RagConfig(Section):
    """How RAG answers are asked for. Small models loop under greedy decoding (the same line
    again and again, or a run of citation markers); forbidding the answer to repeat its own
    n-grams stops that while it may still copy the sources' words."""

    system_prompt: str = Field(
        default=(
            "You answer questions from the sources the user gives. Use only facts stated in "
            "the sources, in a few sentences, and cite each one by its number in square "
            "brackets, like [1]. If the sources do not answer the question, say that they do not."
        ),
        min_length=1,
        max_length=4000,
    )
    no_repeat_ngram: int = Field(
        default=3,
        ge=0,
        le=16,
        description="The answer never repeats an n-gram of its own tokens (0: off).",
    )
    grounding_citation: bool = Field(
        default=True,
        description=(
            "An answer that cites none of its sources gets the one holding at least half of "
            "its words (pipelines/citations.py). Markers naming no source are always dropped."
        ),
    )
    # own: on a 2-core AMX Xeon, llama.cpp (chat's engine there) reads a RAG prompt at 145-165
    # tokens/s, transformers' bf16 at 800-1,200. With chat streaming (4 clients) and RAG at
    # once: RAG's first token after 1.8 s (own) against 5.8 s (shared), and chat 48.0 tokens/s
    # against 20.8, as every RAG prompt read stalls a shared decode loop
    # (docs/benchmarks/rag_generator.md).
    generator: Literal["own", "shared"] = Field(
        default="own",
        description="own: RAG answers come from a Generator deployment of their own "
        "(RagGenerator, the generator's settings), whose `engine: auto` picks the engine "
        "that answers a long-prompt RAG question soonest, and chat's load never queues them. "
        "shared: the one Generator answers every route (one copy of the model in memory).",
    )


class CacheConfig(Section):
    """Embedding and response caches: in-process LRU per replica, or Redis when `redis_url` is set.

    A cache never fails a request: where Redis is down, a lookup is a miss and a store is skipped.
    """

    redis_url: str | None = Field(
        default=None,
        repr=False,
        description="Set by REDIS_URL. None: an in-process LRU in each replica.",
    )
    embedding_entries: int = Field(default=20_000, ge=0, le=10_000_000, description="0: off.")
    embedding_ttl_s: float = Field(default=7 * 24 * 3600, gt=0.0, description="In Redis.")
    response_entries: int = Field(default=10_000, ge=0, le=1_000_000, description="0: off.")
    response_ttl_s: float = Field(default=300.0, gt=0.0)
    # An in-process cache is bounded in bytes as well as entries: a search answer can carry
    # top_k copies of 16 KiB metadata. In any backend one entry may take at most 1/16 of its
    # cache's bytes; a larger value is not cached.
    embedding_bytes: int = Field(
        default=64 * 2**20, ge=2**16, le=2**40, description="In-process embedding cache."
    )
    response_bytes: int = Field(
        default=128 * 2**20, ge=2**16, le=2**40, description="In-process response caches."
    )
    redis_timeout_s: float = Field(
        default=0.05, gt=0.0, le=5.0, description="A slower Redis answer counts as a miss."
    )


class ClassifyConfig(Section):
    """The classification cascade: embedding similarity first, the generator when unsure."""

    threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Escalate when the top probability is below. None: the threshold "
        "calibrated for this model pair (serve_app/classify_calibration.json), or 0 without one.",
    )
    # Softmax temperature over cosine similarities to the label descriptions, fitted by
    # scripts/bench_classify.py (least negative log-likelihood on 180 labelled manual-page
    # descriptions, 6 labels: 0.151). Refit it on your own labels and texts.
    temperature: float = Field(default=0.15, gt=0.0, le=10.0)
    # Words that turn a sentence ("good, but ..."): their presence escalates under `auto` in
    # the languages of `contrast_languages`. Markers of letters are matched as whole words;
    # others (Korean endings) anywhere.
    contrast_markers: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "en": ["but", "though", "although", "however", "yet", "except"],
            "ko": ["지만", "는데", "그러나", "하지만"],
        }
    )
    contrast_languages: list[str] | None = Field(
        default=None,
        description="Languages whose contrast markers escalate. None: all of them, but only "
        "where the calibration found that markers predict fast-path errors.",
    )
    max_labels: int = Field(default=32, ge=2, le=1000)
    # Bounds on what one request may ask of the generator; inputs past them keep their
    # fast-path answer, and the response says so.
    max_escalated: int = Field(default=16, ge=0, le=1024, description="Inputs per request.")
    max_prompt_tokens: int = Field(
        default=1024, ge=64, le=32768, description="Instruction, label descriptions and text."
    )
    latency_budget_ms: float | None = Field(
        default=None,
        gt=0.0,
        description="Mean ms per input that calibration may spend. None: twice the fast path's.",
    )


class PrecomputeLive(Section):
    """The Precompute deployment's `user_config`, changed in place: which answers it keeps
    computed ahead of time, and how often it looks."""

    enabled: bool = True
    interval_s: float = Field(default=30.0, ge=1.0, le=86_400.0, description="Between passes.")
    top_n: int = Field(default=20, ge=1, le=10_000, description="Requests kept precomputed.")
    min_count: int = Field(default=3, ge=1, description="Times asked before a request ranks.")
    window_s: float = Field(
        default=86_400.0, gt=0.0, description="Only requests asked within it rank; older counts go."
    )
    max_age_s: float = Field(
        default=3600.0, gt=0.0, description="An answer older than this is computed again."
    )
    kinds: list[Literal["search", "rag"]] = Field(default_factory=lambda: ["search", "rag"])


class PrecomputeConfig(Section):
    """Popular queries: the ingress counts every search and RAG request in PostgreSQL, a
    scheduled job keeps the answers of the most asked ones computed, and the ingress answers
    those from memory until their collection changes."""

    count_queries: bool = True
    serve_precomputed: bool = True
    flush_interval_s: float = Field(
        default=5.0, gt=0.0, le=3600.0, description="Counts are written in batches this often."
    )
    versions_check_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="Each ingress re-reads collection versions this often, besides the "
        "notifications: the longest a missed change can serve stale precomputed answers.",
    )
    # The default user_config of the Precompute deployment; `deployments[].user_config`
    # overrides it live.
    schedule: PrecomputeLive = PrecomputeLive()


Route = Literal["embeddings", "rerank", "chat", "search", "rag", "ingest", "classify", "manage"]


class RouteLimits(Section):
    """How much of one route runs and waits at once in an ingress replica, and for how long."""

    max_running: int = Field(ge=1, le=100_000)
    max_queued: int = Field(ge=0, le=100_000)
    deadline_s: float = Field(gt=0.0, le=3600.0, description="From arrival to the last byte.")
    shed: bool = Field(default=False, description="Refused while the host is under pressure.")
    retry_after_s: int = Field(
        default=1, ge=0, le=3600, description="Sent with a 503: about one request's run time."
    )


class Shedding(Section):
    """When requests are refused because they would suffer, not because the host is busy.

    Stall shares are pressure-stall information (PSI `some`: the share of wall time in which
    at least one task waited for the resource), of this container's cgroup where it has its
    own, else of the host. CPU use itself is not a signal: a host at 100% that answers within
    its deadlines is busy, not overloaded. 100 turns a percentage off.
    """

    memory_percent: float = Field(
        default=90.0,
        gt=0.0,
        le=100.0,
        description="Memory in use (page cache excluded), of the cgroup's limit where it has "
        "one, else of the host, above which `shed` routes answer 503.",
    )
    memory_stall_percent: float = Field(
        default=20.0, gt=0.0, le=100.0, description="Memory stalls above which `shed` routes 503."
    )
    # Only requests that would wait for a slot are refused for CPU stalls: one that can run
    # now is admitted, so work that merely keeps the CPU busy (model loading at start-up,
    # a full decode batch) never refuses a request the server has room for.
    cpu_stall_percent: float = Field(
        default=80.0,
        gt=0.0,
        le=100.0,
        description="CPU stalls (or cgroup throttling) above which a `shed` request that "
        "would queue gets 503.",
    )
    queue_wait_fraction: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Any route whose oldest queued request has waited this share of its "
        "deadline answers 503: a newcomer would likely reach its deadline queued.",
    )
    window_s: float = Field(
        default=5.0, gt=0.0, le=300.0, description="Stall shares are measured over it."
    )
    interval_s: float = Field(default=0.5, gt=0.0, le=60.0, description="Sampling period.")


DEFAULT_ROUTE_LIMITS: dict[str, RouteLimits] = {
    # Sized from measurement: a single-sentence request is one slot, and 64 running fill
    # the embedder's batches of 64 (docs/benchmarks/).
    "embeddings": RouteLimits(max_running=64, max_queued=256, deadline_s=30),
    # A query-likelihood rerank of 8-20 passages takes about 1-2 s of the model alone.
    "rerank": RouteLimits(max_running=4, max_queued=16, deadline_s=60, retry_after_s=2),
    # A chat or RAG answer takes seconds: clients told to come back in 1 s would mostly
    # find the route still full, and on 2 cores their retries cost the decoding CPU.
    "chat": RouteLimits(max_running=8, max_queued=24, deadline_s=120, shed=True, retry_after_s=5),
    "search": RouteLimits(max_running=4, max_queued=20, deadline_s=30),
    "rag": RouteLimits(max_running=2, max_queued=10, deadline_s=120, shed=True, retry_after_s=5),
    "ingest": RouteLimits(max_running=2, max_queued=10, deadline_s=300, shed=True, retry_after_s=5),
    # Mostly embeddings; an escalated input costs one generator forward pass per label set.
    "classify": RouteLimits(max_running=4, max_queued=16, deadline_s=60, retry_after_s=2),
    # /v1/status, /v1/collections and the deletes: each holds a store connection of the
    # Documents replica (4 in its pool), so a flood of them answers 503 rather than taking
    # the connections ingest needs.
    "manage": RouteLimits(max_running=2, max_queued=8, deadline_s=30),
}


class Admission(Section):
    """Per-route limits and load shedding, the part of `IngressLive` admission reads.

    Each ingress replica enforces these limits on its own: with N ingress replicas a route
    admits up to N times `max_running`, as Serve's own queues count per caller.
    """

    routes: dict[Route, RouteLimits] = Field(default_factory=lambda: dict(DEFAULT_ROUTE_LIMITS))
    shedding: Shedding = Shedding()


class InputLimits(Section):
    """What one request may hold. Past these the ingress answers 4xx before any model runs."""

    max_body_bytes: int = Field(default=32 * 2**20, ge=1024, le=2**31, description="Else 413.")
    max_inputs: int = Field(default=2048, ge=1, le=100_000, description="Embedding inputs.")
    max_input_chars: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="Each embedding input, rerank query or document, search query, message.",
    )
    max_documents: int = Field(
        default=1000, ge=1, le=100_000, description="Rerank documents; ingested documents."
    )
    max_document_chars: int = Field(
        default=5_000_000, ge=1, le=100_000_000, description="Each ingested document."
    )
    max_messages: int = Field(default=256, ge=1, le=100_000, description="Chat messages.")
    # 10,000 chunks take about the ingest deadline to embed on the 2-core reference machine.
    max_chunks: int = Field(
        default=10_000, ge=1, le=10_000_000, description="Chunks of one ingest request."
    )
    # Each search result carries its document's metadata, and answers are cached and held
    # precomputed in every ingress: bounding it bounds them.
    max_metadata_bytes: int = Field(
        default=16 * 1024, ge=2, le=2**24, description="Each document's metadata, as JSON."
    )
    max_filter_bytes: int = Field(
        default=16 * 1024, ge=2, le=2**24, description="A search or RAG filter, as JSON."
    )


class AuthConfig(Section):
    """API keys. With any key set, every /v1 route needs `Authorization: Bearer <key>`.

    Keys come from the environment variable named `api_keys_env` (comma-separated) and from
    `api_keys_file` (one per line, `#` comments), never from the serve config itself, so they
    do not show in the dashboard or in logs.
    """

    api_keys_env: str = Field(default="RAG_API_KEYS", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    api_keys_file: Path | None = None


class Uploads(Section):
    """How request bodies may arrive: stalled or slow uploads must not hold the ingress."""

    body_timeout_s: float = Field(
        default=60.0, gt=0.0, le=3600.0, description="The whole body arrives within it; else 408."
    )
    max_bytes_in_flight: int = Field(
        default=256 * 2**20,
        ge=2**20,
        le=2**36,
        description="Body bytes one ingress replica holds at once, all requests together; "
        "past it 503.",
    )


# A Host header: a name, an IPv4 address or a bracketed IPv6 address, and an optional port.
HOST_PATTERN = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?"


class Coalescing(Section):
    """Concurrent /v1/embeddings requests of one ingress replica go to the Embedder as one
    call (serve_app/http/coalesce.py); a request of `max_inputs` or more goes alone.
    scripts/bench_peers.py measures it (docs/benchmarks/peers.md)."""

    enabled: bool = True
    max_inputs: int = Field(default=64, ge=1)
    # How long the first request of a call waits for company; 0: only the requests that
    # queued while the previous calls were in flight.
    wait_ms: float = Field(default=0.0, ge=0.0, le=100.0)


class IngressLive(Section):
    """The Ingress's `user_config`, all applied in place: route limits and shedding, input
    limits, API keys, uploads and the Host names it answers to."""

    routes: dict[Route, RouteLimits] = Field(default_factory=lambda: dict(DEFAULT_ROUTE_LIMITS))
    shedding: Shedding = Shedding()
    inputs: InputLimits = InputLimits()
    auth: AuthConfig = AuthConfig()
    uploads: Uploads = Uploads()
    coalescing: Coalescing = Coalescing()
    # None: the host Serve binds (http_options.host) and the loopback names, any port; a
    # wildcard bind answers any Host. `*` answers any Host; `name:port` only that port.
    allowed_hosts: list[Annotated[str, Field(pattern=rf"^(\*|{HOST_PATTERN})$")]] | None = None

    @property
    def admission(self) -> Admission:
        return Admission(routes=self.routes, shedding=self.shedding)


class IngressConfig(Section):
    ready_timeout_s: float = Field(default=2.0, gt=0.0)
    # The defaults of the Ingress's user_config: `deployments[].user_config` is laid over
    # them, field by field, and changes running replicas in place.
    live: IngressLive = IngressLive()


class AppConfig(BaseSettings):
    """The whole application. Built from `args`; `RAG_*` environment variables fill the rest."""

    model_config = SettingsConfigDict(
        env_prefix="RAG_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        protected_namespaces=(),
    )

    embedder: EmbedderConfig = EmbedderConfig()
    reranker: RerankerConfig = RerankerConfig()
    generator: GeneratorConfig = GeneratorConfig()
    ingress: IngressConfig = IngressConfig()
    store: StoreConfig = StoreConfig()
    chunking: Chunking = Chunking()
    retrieval: RetrievalConfig = RetrievalConfig()
    cache: CacheConfig = CacheConfig()
    classify: ClassifyConfig = ClassifyConfig()
    rag: RagConfig = RagConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    # DATABASE_URL is the conventional name; it wins over store.database_url from args.
    database_url: str | None = Field(
        default=None, validation_alias="DATABASE_URL", exclude=True, repr=False
    )
    # REDIS_URL likewise wins over cache.redis_url.
    redis_url: str | None = Field(
        default=None, validation_alias="REDIS_URL", exclude=True, repr=False
    )
    model_cache_dir: Path = Field(
        default=Path("~/.cache/rag-serve/models"),
        description="Where converted model weights are kept (e.g. GGUF -> safetensors).",
    )

    @model_validator(mode="after")
    def _resolve(self) -> AppConfig:
        # Replicas may start in another working directory: resolve paths once, here.
        object.__setattr__(self, "model_cache_dir", self.model_cache_dir.expanduser().resolve())
        store = self.store.model_copy(
            update={
                "data_dir": self.store.data_dir.expanduser().resolve(),
                "database_url": self.database_url or self.store.database_url,
            }
        )
        object.__setattr__(self, "store", store)
        if self.redis_url:
            object.__setattr__(
                self, "cache", self.cache.model_copy(update={"redis_url": self.redis_url})
            )
        return self

    def models(self) -> dict[str, ModelDeployment]:
        return {"embedder": self.embedder, "reranker": self.reranker, "generator": self.generator}
