"""scripts/benchkit: percentiles, texts that never repeat, the report writer and output options, the
localhost guard, and the closed-loop load generator against a tiny local aiohttp server."""

import argparse
import asyncio
import json
import sys
import time
from itertools import count, repeat
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))  # as when a script runs as a file: `benchkit` beside it

from benchkit import child, cluster, corpus, loadgen, measure, report  # noqa: E402


def test_percentiles_in_milliseconds():
    latencies = [(i + 1) / 10 for i in range(10)]  # 0.1 .. 1.0 s
    assert report.percentiles_ms(latencies) == {"p50": 550.0, "p95": 955.0, "p99": 991.0}
    assert report.percentiles_ms([0.25]) == {"p50": 250.0, "p95": 250.0, "p99": 250.0}
    assert report.percentiles_ms([]) == {"p50": None, "p95": None, "p99": None}


def test_texts_never_repeat_unless_asked():
    texts = corpus.Texts(["a", "b", "c"])
    assert texts.take(7) == ["a", "b", "c", "a [2]", "b [2]", "c [2]", "a [3]"]
    assert texts.cursor == 7
    assert corpus.Texts(["a", "b"], start=1, repeat=True).take(4) == ["b", "a", "b", "a"]
    with pytest.raises(ValueError):
        corpus.Texts([])


def test_sentences_are_split_by_length():
    text = "One two three. " + "word " * 9 + "end. Short one!"
    assert corpus.split_sentences(text, 8, 40) == [" ".join(["word"] * 9 + ["end."])]
    assert all(8 <= len(s.split()) <= 40 for s in corpus.license_sentences(50))


def test_troff_is_stripped():
    source = ".TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n.B ls\nlists."
    description, body = corpus.troff_to_text(source)
    assert description == "list directory contents"
    assert "Description" in body and "ls" in body and "\\" not in body


def test_troff_preambles_comments_and_macro_definitions_are_no_text():
    """The forms Pod::Man, rst2man and asciidoc pages start with: none of it is page text."""
    source = "\n".join(
        [
            "'\\\" t",
            '.\\" Standard preamble:',
            '.de Vb \\" Begin verbatim text',
            ".ne \\\\$1",
            "..",
            ".ie n \\{\\",
            "\\{\\",
            ".de1 rstReportMargin",
            "\\\\$1 \\\\n[an-margin]",
            "level \\\\n[rst2man-indent-level]",
            "..",
            ".ig",
            "ignored words",
            "..",
            ".SH NAME",
            "tool \\- do a thing",
            ".SH SYNOPSIS",
            "'br",
            ".B tool",
            "[options]",
        ]
    )
    description, body = corpus.troff_to_text(source)
    assert description == "do a thing"
    assert body == "Synopsis\n tool [options]"


def _man_page(folder, name: str, description: str, body: str) -> None:
    import gzip

    source = f".TH X 1\n.SH NAME\n{name} \\- {description}\n.SH DESCRIPTION\n{body}\n"
    with gzip.open(folder / f"{name}.1.gz", "wt") as page:
        page.write(source)


def test_man_pages_count_once_and_shared_names_are_no_queries(tmp_path, monkeypatch):
    """A page installed under two names is one document; two different pages with the same
    NAME line stay documents, but neither is asked for."""
    folder = tmp_path / "man1"
    folder.mkdir()
    text = "Lots of words about the command and what it does with its files. " * 6
    _man_page(folder, "alpha", "first of the commands here", text)
    _man_page(folder, "alias", "first of the commands here", text)  # the same page again
    _man_page(folder, "beta", "one shared description line", "Beta's own long text. " * 20)
    _man_page(folder, "gamma", "one shared description line", "Gamma's own long text. " * 20)
    monkeypatch.setattr(corpus, "MAN", tmp_path)
    docs = corpus.man_corpus(10, 2000)
    assert sorted(d["id"] for d in docs) == ["alias.1", "beta.1", "gamma.1"]
    asked = {d["id"] for d in docs if d["labelled"]}
    assert asked == {"alias.1"}


STATUS = """Package: curl
Status: install ok installed
Description: command line tool for transferring data with URL syntax
 curl is a command line tool for transferring data with URL syntax, supporting
 DICT, FILE, FTP, FTPS, GOPHER, HTTP, HTTPS, IMAP, IMAPS, LDAP, LDAPS, POP3, POP3S.
 .
 curl supports SSL certificates, HTTP POST, HTTP PUT, FTP uploading and proxies.
Homepage: https://curl.se/

Package: libfoo1
Description: shared library for foo
 This package contains the shared library of foo, which nobody could tell apart
 from the shared library of bar by its description alone, it is the same text.

Package: libbar1
Description: shared library for bar
 This package contains the shared library of foo, which nobody could tell apart
 from the shared library of bar by its description alone, it is the same text.

Package: tiny
Description: a package described too briefly
 Short.
"""


def test_package_descriptions_become_labelled_queries(tmp_path):
    status = tmp_path / "status"
    status.write_text(STATUS)
    docs = corpus.package_corpus(10, status)
    assert [d["id"] for d in docs] == ["curl"]  # shared and too short descriptions left out
    curl = docs[0]
    assert curl["query"] == "command line tool for transferring data with URL syntax"
    assert curl["text"].startswith("curl is a command line tool for transferring data")
    assert "POP3S. curl supports SSL" in curl["text"] and "Homepage" not in curl["text"]
    assert corpus.package_corpus(10, tmp_path / "missing") == []


def test_cpu_by_stage_counts_each_process_under_its_kind():
    """A live child whose command line names llama-server spends ~0.3 s of CPU: the meter
    counts it under that kind (and only once), and this process under the load generator."""
    import subprocess

    burn = (
        "import sys, time\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\nsys.stdin.read()"
    )
    before = measure.cpu_by_stage()
    child_ = subprocess.Popen([sys.executable, "-c", burn, "llama-server"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while (
            measure.cpu_by_stage().get("llama-server", 0.0) - before.get("llama-server", 0.0) < 0.3
        ):
            assert time.monotonic() < deadline, "the child's CPU never showed up"
            time.sleep(0.05)
        after = measure.cpu_by_stage()
    finally:
        child_.communicate(b"")
    assert 0.3 <= after["llama-server"] - before.get("llama-server", 0.0) < 1.5
    assert after[measure.LOAD_GENERATOR] > before.get(measure.LOAD_GENERATOR, 0.0)


def test_write_report_writes_json_markdown_and_plot(tmp_path, capsys):
    def plot(data: dict, path: Path) -> None:
        path.write_bytes(b"png of " + str(data["n"]).encode())

    path = report.write_report(
        {"n": 3}, "thing", lambda r: f"# n = {r['n']}\n", tmp_path / "new", plot
    )
    assert path == tmp_path / "new" / "thing.json"
    assert json.loads(path.read_text()) == {"n": 3}
    assert (tmp_path / "new" / "thing.md").read_text() == "# n = 3\n"
    assert (tmp_path / "new" / "thing.png").read_bytes() == b"png of 3"
    assert "# n = 3" in capsys.readouterr().out


def test_smoke_runs_write_elsewhere_than_the_published_figures(tmp_path):
    parser = argparse.ArgumentParser()
    report.add_output_options(parser, "tiny")
    assert report.output_dir(parser.parse_args([])) == report.DOCS
    smoke = report.output_dir(parser.parse_args(["--smoke"]))
    assert smoke != report.DOCS and smoke.is_dir()
    given = report.output_dir(parser.parse_args(["--smoke", "--out", str(tmp_path)]))
    assert given == tmp_path


def test_only_this_machine_is_loaded():
    for url in ("http://127.0.0.1:8000", "http://localhost:8000/", "http://[::1]:8000"):
        assert loadgen.local_url(url) == url.rstrip("/")
    for url in ("http://example.com:8000", "http://10.0.0.1:8000", "ftp://127.0.0.1"):
        with pytest.raises(ValueError):
            loadgen.local_url(url)


def test_retry_after_is_bounded():
    assert loadgen.retry_after_s({"retry-after": "2"}) == 2.0
    assert loadgen.retry_after_s({"retry-after": "3600"}) == 30.0
    assert loadgen.retry_after_s({"retry-after": "0"}) == 0.1
    assert loadgen.retry_after_s({"retry-after": "soon"}) == 1.0


async def serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def test_closed_loop_records_every_answer_and_waits_retry_after():
    seen: list[tuple[str, object]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json() if request.method == "POST" else None
        seen.append((request.method, body))
        await asyncio.sleep(0.01)
        if isinstance(body, dict) and body["n"] % 4 == 3:
            return web.Response(status=503, headers={"Retry-After": "0.2"})
        return web.json_response({"items": 2})

    async def main() -> tuple[list[loadgen.Record], loadgen.StepWindow]:
        runner, url = await serve(handler)
        records: list[loadgen.Record] = []
        try:
            async with loadgen.session(url, 3, timeout_s=5) as session:
                t0 = time.perf_counter()
                requests = ({"n": n} for n in range(10**6))
                window = await loadgen.closed_loop(
                    session,
                    "/v1/x",
                    requests,
                    3,
                    records,
                    t0,
                    duration=0.6,
                    read=lambda status, content: (
                        json.loads(content)["items"] if status == 200 else 0
                    ),
                )
        finally:
            await runner.cleanup()
        return records, window

    records, window = asyncio.run(main())
    assert window.concurrency == 3 and 0.6 <= window.end - window.start < 1.5
    assert len(records) == len(seen) > 6  # every request sent is recorded, once
    assert all(method == "POST" for method, _ in seen)
    assert sorted(b["n"] for _, b in seen) == list(range(len(seen)))  # each input sent once
    refused = [r for r in records if r.status == "503"]
    assert refused and all(r.retry_after and r.detail == 0 for r in refused)
    assert all(r.detail == 2 for r in records if r.status == "200")
    # A refused client waited its Retry-After (0.2 s), so it sent fewer than the others could.
    assert len(refused) <= 3 * 4


def test_closed_loop_stops_on_an_event_and_counts_transport_errors():
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> tuple[list[loadgen.Record], list[loadgen.Record]]:
        runner, url = await serve(handler)
        got: list[loadgen.Record] = []
        try:
            async with loadgen.session(url, 2, timeout_s=5) as session:
                stop = asyncio.Event()
                asyncio.get_running_loop().call_later(0.3, stop.set)
                await loadgen.closed_loop(
                    session, "/healthz", repeat(None), 2, got, time.perf_counter(), stop=stop
                )
        finally:
            await runner.cleanup()
        # Nothing listens any more: every request is a transport error, paced by error_pause.
        failed: list[loadgen.Record] = []
        async with loadgen.session(url, 1, timeout_s=1) as session:
            await loadgen.closed_loop(
                session,
                "/healthz",
                repeat(None),
                1,
                failed,
                time.perf_counter(),
                duration=0.3,
                error_pause=0.1,
            )
        return got, failed

    got, failed = asyncio.run(main())
    assert got and all(r.status == "200" for r in got)
    assert 1 <= len(failed) <= 4 and all(r.status == "error" for r in failed)
    window = loadgen.in_window(got, 0.0, 0.1)
    assert all(r.done <= 0.1 for r in window) and len(window) < len(got)


def test_closed_loop_needs_an_end():
    with pytest.raises(ValueError):
        asyncio.run(loadgen.closed_loop(None, "/", iter(()), 1, [], 0.0))


def test_window_probes_until_settled_reads_the_meter_and_counts_only_its_answers():
    seen: list[int] = []
    probes: list[int] = []
    readings = count(1)

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/probe":
            probes.append(len(probes) + 1)
            return web.json_response({"n": len(probes)})
        seen.append((await request.json())["n"])
        await asyncio.sleep(0.02)
        return web.Response(status=503 if len(seen) % 5 == 0 else 200)

    async def probe(session) -> tuple[int, bool]:
        async with session.get("/probe") as response:
            n = (await response.json())["n"]
        return n, n >= 2  # settled on the second ask

    async def main() -> loadgen.Window:
        runner, url = await serve(handler)
        try:
            return await loadgen.window(
                url,
                "/v1/x",
                ({"n": n} for n in range(10**6)),
                3,
                0.2,
                0.4,
                probe=probe,
                meter=lambda: next(readings),
            )
        finally:
            await runner.cleanup()

    measured = asyncio.run(main())
    assert sorted(seen) == list(range(len(seen)))  # each input sent once
    assert measured.start >= 1.2  # the warm-up went on a second for the probe to settle
    assert 0.4 <= measured.end - measured.start < 0.6
    assert (measured.at_start, measured.at_end) == (2, 3)
    assert (measured.before, measured.after) == (1, 2)
    assert all(measured.start <= r.done <= measured.end for r in measured.records)
    assert 0 < len(measured.records) < len(seen)
    statuses = measured.statuses()
    assert statuses["200"] > 0 and statuses["503"] > 0  # refused clients went on (no Retry-After)
    assert len(measured.latencies()) == statuses["200"]


def test_window_awaits_or_drops_the_requests_still_out_at_its_end():
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.Response(text="ok")

    async def main(drop: bool) -> tuple[loadgen.Window, float]:
        runner, url = await serve(handler)
        try:
            start = time.perf_counter()
            # Answers at 0.5 s fall in the window [0.2, 0.7]; those due at 1.0 s are still out.
            measured = await loadgen.window(
                url, "/healthz", repeat(None), 2, 0.2, 0.5, drop_in_flight=drop
            )
            return measured, time.perf_counter() - start
        finally:
            await runner.cleanup()

    awaited, awaited_s = asyncio.run(main(False))
    dropped, dropped_s = asyncio.run(main(True))
    assert len(awaited.records) == len(dropped.records) == 2
    assert awaited_s >= 0.95 and dropped_s < 0.85


def test_a_worker_child_returns_its_result_or_why_not(tmp_path):
    script = tmp_path / "work.py"
    script.write_text(
        "import json, sys\n"
        "assert sys.argv[1] == '--worker'\n"
        "spec = json.load(open(sys.argv[2]))\n"
        "if spec['fail']: sys.exit('no luck')\n"
        "print('progress')\n"
        "json.dump({'doubled': spec['n'] * 2}, open(sys.argv[3], 'w'))\n"
    )
    result, error = child.run_worker(script, {"n": 21, "fail": False}, "a", tmp_path, 60)
    assert (result, error) == ({"doubled": 42}, None)
    result, error = child.run_worker(script, {"n": 1, "fail": True}, "b", tmp_path, 60)
    assert result is None and "no luck" in error


def test_config_url_and_args():
    config = {"http_options": {"port": 18000}, "applications": [{"args": {"a": 1, "b": 2}}]}
    assert cluster.config_url(config) == "http://127.0.0.1:18000"
    changed = cluster.with_args(config, b=3, store={"data_dir": "/x"})
    assert changed["applications"][0]["args"] == {"a": 1, "b": 3, "store": {"data_dir": "/x"}}
    assert config["applications"][0]["args"] == {"a": 1, "b": 2}  # the original is kept
