"""Faults under a bounded load, against the service on this machine; writes docs/benchmarks/chaos.

    .venv/bin/python scripts/chaos.py [--config configs/test.yaml] [--url URL] \\
        [--data-dir data/pgdata] [--outage-s 10] [--gap-s 25] [--recovery-timeout-s 180] \\
        [--name chaos] [--out docs/benchmarks] [--smoke]

Needs a running service with the embedded PostgreSQL, and the Ray cluster it runs on (joined
with `ray.init(address="auto")`). Only 127.0.0.1, localhost and ::1 are accepted. `--config`
names the serve config the service runs (`serve run configs/test.yaml`, or the default
`serve_config.yaml`); the URL defaults to its http_options. Under serve_config.yaml the
service sheds load as it would in production: the report counts what was refused, by route
and reason, and the audit shows that nothing acknowledged was lost.

Clients run a closed loop on every route: embeddings (4), rerank, search (2) and chat (2), rag,
and one writer ingesting numbered one-chunk documents. Every `--gap-s` seconds one fault:
`ray.kill` of the Embedder, Reranker, Search and Generator replicas in turn, then PostgreSQL
stopped for `--outage-s` seconds and started again. After the last fault the writer re-sends
every document whose ingest failed, and the collection is checked in the database itself.

Reported (docs/benchmarks/NAME.json and .md):
- requests sent, and answers by route and status;
- 503s by route and reason (`queue_full`, `queue_wait`, `resource_pressure`, ...): load shed;
- client-visible failures on the idempotent routes (embeddings, rerank, search; a search
  refused with `store_unavailable` while the database is down is the specified answer, and a
  503 `overloaded` is load shedding, the specified answer to load: both counted apart),
  target 0;
- documents lost (acknowledged but absent) or duplicated (more chunks than written), target 0;
- recovery per fault: seconds until the deployment is healthy again with all its replicas, and
  until each affected route answers 200 again.

--smoke: 3 s between faults, a 2 s outage, 120 s to recover.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import ray
import yaml
from benchkit import loadgen
from benchkit.cluster import config_url
from benchkit.report import add_output_options, machine, output_dir, write_report

from serve_app.store.embedded import embedded_url, stop_embedded

RESEND_ATTEMPTS = 20
IDEMPOTENT = ("embeddings", "rerank", "search")
COLLECTION = "chaos"
ROUTES = {
    "embeddings": ("/v1/embeddings", 4),
    "rerank": ("/v1/rerank", 1),
    "search": ("/v1/search", 2),
    "chat": ("/v1/chat/completions", 2),
    "rag": ("/v1/rag/query", 1),
}


def body(route: str, i: int) -> dict:
    query = f"What does item {i % 50} say about lighthouses and ships?"
    return {
        "embeddings": {"input": [f"chaos sentence {i}", "ships and lighthouses"]},
        "rerank": {"query": query, "documents": [f"Item {i} text.", "Lighthouses guide ships."]},
        "search": {"collection": COLLECTION, "query": f"{query} ({i})"},
        "chat": {"messages": [{"role": "user", "content": query}], "max_tokens": 16},
        "rag": {"collection": COLLECTION, "query": query, "max_tokens": 16},
    }[route]


def bodies(route: str) -> Iterator[dict]:
    """The route's request bodies, numbered from 0."""
    return (body(route, i) for i in itertools.count())


def error_of(status: int, content: bytes) -> tuple[str, str | None] | None:
    """A refusal's error code and type (None for a 200)."""
    if status == 200:
        return None
    try:
        error = json.loads(content)["error"]
        return error["code"], error["type"]
    except (ValueError, KeyError, TypeError):
        return "not-json", None


def document(n: int) -> dict:
    return {"id": f"doc-{n}", "text": f"Item {n}: lighthouse {n} guides ships past the rocks."}


class Chaos:
    def __init__(self, url: str, data_dir: Path, recovery_timeout_s: float) -> None:
        self.url, self.data_dir = url, data_dir
        self.recovery_timeout_s = recovery_timeout_s
        self.answers: dict[str, Counter] = defaultdict(Counter)
        self.failures: list[dict] = []  # non-200 answers with their time, type and code
        self.acknowledged: set[str] = set()
        self.unacknowledged: set[str] = set()
        self.stopping = asyncio.Event()
        self.start = time.perf_counter()
        self.db_down: tuple[float, float] | None = None

    def now(self) -> float:
        return round(time.perf_counter() - self.start, 2)

    def record(self, route: str, answer: httpx.Response | None, error: str | None = None) -> None:
        status = str(answer.status_code) if answer is not None else "error"
        self.answers[route][status] += 1
        if status != "200":
            code, kind = error, None
            if answer is not None:
                try:
                    code, kind = answer.json()["error"]["code"], answer.json()["error"]["type"]
                except Exception:
                    code = "not-json"
            self.failures.append(
                {"route": route, "at": self.now(), "status": status, "code": code, "type": kind}
            )

    def absorb(self, route: str, records: list[loadgen.Record]) -> None:
        """A route's closed-loop records counted as `record` counts single answers."""
        for r in records:
            self.answers[route][r.status] += 1
            if r.status != "200":
                code, kind = r.detail or ("transport", None)
                at = round(r.done, 2)
                self.failures.append(
                    {"route": route, "at": at, "status": r.status, "code": code, "type": kind}
                )

    async def clients(self) -> dict[str, list[loadgen.Record]]:
        """Every route's closed loop, until `stopping` is set; their records by route."""
        records: dict[str, list[loadgen.Record]] = {route: [] for route in ROUTES}
        width = sum(clients for _, clients in ROUTES.values())
        async with loadgen.session(self.url, width, timeout_s=180) as session:
            await asyncio.gather(
                *(
                    loadgen.closed_loop(
                        session,
                        path,
                        bodies(route),
                        clients,
                        records[route],
                        self.start,
                        stop=self.stopping,
                        wait_retry_after=False,
                        read=error_of,
                    )
                    for route, (path, clients) in ROUTES.items()
                )
            )
        return records

    async def writer(self, http: httpx.AsyncClient) -> None:
        n = 0
        while not self.stopping.is_set():
            doc = document(n)
            try:
                answer = await http.post(
                    "/v1/documents", json={"collection": COLLECTION, "documents": [doc]}
                )
                self.record("ingest", answer)
                ok = answer.status_code == 200
            except httpx.HTTPError as exc:
                self.record("ingest", None, type(exc).__name__)
                ok = False
            (self.acknowledged if ok else self.unacknowledged).add(doc["id"])
            n += 1
            await asyncio.sleep(0.2)

    async def first_200(self, http: httpx.AsyncClient, route: str, since: float) -> float | None:
        """Seconds from `since` until `route` answers 200 to a fresh request (None: not
        within the recovery timeout)."""
        path = ROUTES[route][0]
        i = 10**7
        while time.perf_counter() - since < self.recovery_timeout_s:
            try:
                if (await http.post(path, json=body(route, i))).status_code == 200:
                    return round(time.perf_counter() - since, 2)
            except httpx.HTTPError:
                pass
            i += 1
            await asyncio.sleep(0.2)
        return None

    async def healthy(self, http: httpx.AsyncClient, deployment: str, since: float) -> float | None:
        """Seconds from `since` until `deployment` is HEALTHY with no replica starting."""
        await asyncio.sleep(1)
        while time.perf_counter() - since < self.recovery_timeout_s:
            try:
                status = (await http.get("/v1/status")).json()["deployments"][deployment]
                if status["status"] == "HEALTHY" and set(status["replicas"]) == {"RUNNING"}:
                    return round(time.perf_counter() - since, 2)
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.5)
        return None

    async def kill(self, http: httpx.AsyncClient, deployment: str, routes: list[str]) -> dict:
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::rag#{deployment}#")
        ]
        at = time.perf_counter()
        for name in names:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        back = await asyncio.gather(
            self.healthy(http, deployment, at), *(self.first_200(http, r, at) for r in routes)
        )
        return {
            "fault": f"kill {deployment}",
            "at_s": round(at - self.start, 2),
            "replicas_killed": len(names),
            "healthy_after_s": back[0],
            "first_200_after_s": dict(zip(routes, back[1:], strict=True)),
        }

    async def outage(self, http: httpx.AsyncClient, seconds: float) -> dict:
        at = time.perf_counter()
        await asyncio.to_thread(stop_embedded, self.data_dir)
        await asyncio.sleep(seconds)
        await asyncio.to_thread(embedded_url, self.data_dir)
        up = time.perf_counter()
        self.db_down = (at - self.start, up - self.start)
        back = await asyncio.gather(*(self.first_200(http, r, up) for r in ("search", "rag")))
        return {
            "fault": "stop PostgreSQL",
            "at_s": round(at - self.start, 2),
            "down_s": round(up - at, 2),
            "first_200_after_restart_s": dict(zip(("search", "rag"), back, strict=True)),
        }

    async def run(self, gap_s: float, outage_s: float) -> list[dict]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=self.url, timeout=180, limits=limits) as http:
            # A fresh collection: the audit then counts this run's documents only.
            gone = await http.delete(f"/v1/collections/{COLLECTION}")
            if gone.status_code not in (200, 404):
                gone.raise_for_status()
            seed = {"collection": COLLECTION, "documents": [document(-1)]}
            (await http.post("/v1/documents", json=seed)).raise_for_status()
            self.acknowledged.add("doc--1")
            load = asyncio.create_task(self.clients())
            writing = asyncio.create_task(self.writer(http))
            faults = []
            plan = [
                ("Embedder", ["embeddings", "search"]),
                ("Reranker", ["rerank"]),
                ("Search", ["search"]),
                ("Generator", ["chat", "rag"]),
            ]
            for deployment, routes in plan:
                await asyncio.sleep(gap_s)
                faults.append(await self.kill(http, deployment, routes))
                print(faults[-1])
            await asyncio.sleep(gap_s)
            faults.append(await self.outage(http, outage_s))
            print(faults[-1])
            await asyncio.sleep(gap_s)
            self.stopping.set()
            await writing
            for route, records in (await load).items():
                self.absorb(route, records)
            self.failures.sort(key=lambda f: f["at"])
            # The writer's failed ingests, sent again: each must now complete.
            for doc_id in sorted(self.unacknowledged - self.acknowledged):
                if await self.resend(http, int(doc_id.removeprefix("doc-"))):
                    self.acknowledged.add(doc_id)
        return faults

    async def resend(self, http: httpx.AsyncClient, n: int) -> bool:
        """Ingest document `n` again, honouring `Retry-After` while the service sheds load."""
        for _ in range(RESEND_ATTEMPTS):
            answer = await http.post(
                "/v1/documents", json={"collection": COLLECTION, "documents": [document(n)]}
            )
            self.record("ingest-retry", answer)
            if answer.status_code != 503:
                return answer.status_code == 200
            await asyncio.sleep(float(answer.headers.get("retry-after", 1)))
        return False

    def audit(self) -> dict:
        """Documents as the database holds them, against what was acknowledged."""
        with psycopg.connect(embedded_url(self.data_dir)) as conn:
            rows = conn.execute(
                "SELECT d.id, (SELECT count(*) FROM chunks k"
                " WHERE k.collection_id = d.collection_id AND k.document_id = d.id)"
                " FROM documents d JOIN collections c ON c.id = d.collection_id"
                " WHERE c.name = %s",
                (COLLECTION,),
            ).fetchall()
        chunks = dict(rows)
        return {
            "acknowledged": len(self.acknowledged),
            "stored": len(chunks),
            "lost": sorted(self.acknowledged - set(chunks)),
            "duplicated": sorted(d for d, n in chunks.items() if n != 1),
            "failed_then_completed": len(self.unacknowledged & self.acknowledged),
        }


def shed(chaos: Chaos) -> dict[str, dict[str, int]]:
    """503 `overloaded` answers (load shed) by route and reason."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for f in chaos.failures:
        if f["type"] == "overloaded":
            counts[f["route"]][f["code"]] += 1
    return {route: dict(sorted(c.items())) for route, c in sorted(counts.items())}


def idempotent_failures(chaos: Chaos) -> dict:
    visible, outage, overloaded = [], [], []
    for f in chaos.failures:
        if f["route"] not in IDEMPOTENT:
            continue
        down = chaos.db_down
        during = down is not None and down[0] <= f["at"] <= down[1] + 5
        if f["type"] == "overloaded":
            overloaded.append(f)
        elif f["code"] == "store_unavailable" and during:
            outage.append(f)
        else:
            visible.append(f)
    return {
        "visible": visible,
        "store_unavailable_during_outage": len(outage),
        "shed": len(overloaded),
    }


def _seconds(value: float | None) -> str:
    return "not within the recovery timeout" if value is None else f"{value} s"


def markdown(report: dict) -> str:
    lines = [
        "# Chaos: faults under load",
        "",
        f"`{report['command']}`, {report['machine']['cpu']}, {report['seconds']} s.",
        "",
        "| route | answers by status |",
        "|---|---|",
    ]
    for route, statuses in report["answers"].items():
        lines.append(f"| {route} | {', '.join(f'{s}: {n}' for s, n in statuses.items())} |")
    failures = report["idempotent_failures"]
    docs = report["documents"]
    lines += [
        "",
        f"- Requests sent: {report['requests']}.",
        f"- Client-visible failures on idempotent routes: **{len(failures['visible'])}** "
        f"(target 0); searches refused with `store_unavailable` while PostgreSQL was down: "
        f"{failures['store_unavailable_during_outage']}; requests to them shed (503 "
        f"`overloaded`): {failures['shed']}.",
        "- Load shed (503 `overloaded`), by route and reason: "
        + (
            "; ".join(
                f"{route} " + ", ".join(f"`{code}` {n}" for code, n in codes.items())
                for route, codes in report["shed"].items()
            )
            or "none"
        )
        + ".",
        f"- Documents acknowledged {docs['acknowledged']}, stored {docs['stored']}: "
        f"lost **{len(docs['lost'])}**, duplicated **{len(docs['duplicated'])}** (target 0); "
        f"{docs['failed_then_completed']} failed during a fault and completed when sent again.",
        "",
        "| fault | at (s) | recovery |",
        "|---|---|---|",
    ]
    for f in report["faults"]:
        if "healthy_after_s" in f:
            routes = ", ".join(f"{r} {_seconds(s)}" for r, s in f["first_200_after_s"].items())
            recovery = f"healthy after {_seconds(f['healthy_after_s'])}; first 200: {routes}"
        else:
            routes = ", ".join(
                f"{r} {_seconds(s)}" for r, s in f["first_200_after_restart_s"].items()
            )
            recovery = f"down {f['down_s']} s; first 200 after restart: {routes}"
        lines.append(f"| {f['fault']} | {f['at_s']} | {recovery} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/test.yaml"))
    parser.add_argument("--url", help="default: the config's http_options")
    parser.add_argument("--name", default="chaos", help="report name under --out")
    parser.add_argument("--data-dir", type=Path, default=Path("data/pgdata"))
    parser.add_argument("--gap-s", type=float, default=25.0)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--recovery-timeout-s", type=float, default=180.0)
    add_output_options(parser, "3 s between faults, a 2 s outage, 120 s to recover")
    args = parser.parse_args()
    if args.smoke:
        args.gap_s, args.outage_s, args.recovery_timeout_s = 3.0, 2.0, 120.0
    try:
        args.url = loadgen.local_url(
            args.url or config_url(yaml.safe_load(args.config.read_text()))
        )
    except ValueError as e:
        parser.error(f"--url: {e}")
    ray.init(address="auto", log_to_driver=False)
    chaos = Chaos(args.url, args.data_dir.resolve(), args.recovery_timeout_s)
    faults = asyncio.run(chaos.run(args.gap_s, args.outage_s))
    answers = {route: dict(sorted(c.items())) for route, c in sorted(chaos.answers.items())}
    report = {
        "command": f"serve run {args.config}; python scripts/chaos.py --config {args.config} "
        f"--gap-s {args.gap_s:g} --outage-s {args.outage_s:g}",
        "config": str(args.config),
        "machine": machine(),
        "seconds": chaos.now(),
        "requests": sum(sum(c.values()) for c in chaos.answers.values()),
        "answers": answers,
        "shed": shed(chaos),
        "idempotent_failures": idempotent_failures(chaos),
        "documents": chaos.audit(),
        "faults": faults,
        "failures": chaos.failures,
    }
    write_report(report, args.name, markdown, output_dir(args))


if __name__ == "__main__":
    main()
