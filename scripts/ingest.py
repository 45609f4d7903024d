"""Ingest a folder of .txt, .md and .pdf files, or a JSONL file, through the HTTP API.

    .venv/bin/python scripts/ingest.py PATH --collection NAME [--url http://127.0.0.1:8000]
        [--api-key KEY (default: $RAG_API_KEY)]

A file's id is its path relative to PATH (a JSONL line's `id`, or the hash of its `text`), so
running it again replaces documents instead of duplicating them. JSONL lines are
`{"id"?, "text", "metadata"?}`. Files reached through a symbolic link that leads out of PATH are
skipped. A 503 is retried after its `Retry-After`, a bounded number of times. Prints documents/s
and chunks/s at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from tqdm import tqdm

SUFFIXES = {".txt", ".md", ".pdf"}
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is waited this long


def read_pdf(path: Path) -> str:
    from pypdf import PdfReader

    return "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)


def documents(source: Path) -> Iterator[dict]:
    """Documents of a folder (recursively) or of a JSONL file, skipping empty ones."""
    if source.is_file() and source.suffix == ".jsonl":
        with source.open() as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    doc = json.loads(line)
                    if not isinstance(doc, dict) or not str(doc.get("text", "")).strip():
                        raise SystemExit(f"{source}:{number}: each line needs a non-empty 'text'")
                    yield doc
        return
    files = [source] if source.is_file() else folder_files(source)
    for path in files:
        if path.suffix.lower() not in SUFFIXES or not path.is_file():
            continue
        text = read_pdf(path) if path.suffix.lower() == ".pdf" else path.read_text(errors="replace")
        if text.strip():
            doc_id = str(path.relative_to(source)) if source.is_dir() else path.name
            yield {
                "id": doc_id,
                "text": text,
                "metadata": {"source": doc_id, "type": path.suffix[1:]},
            }


def folder_files(root: Path) -> list[Path]:
    """The files under `root`, sorted. Linked folders are not entered, and a linked file
    counts only if it resolves inside `root`: a link must not send another folder's files
    (~/.ssh, /etc) to the server."""
    inside = root.resolve()
    files = []
    for folder, _, names in os.walk(root):  # followlinks=False: linked folders stay closed
        for name in names:
            path = Path(folder) / name
            if path.resolve().is_relative_to(inside):
                files.append(path)
    return sorted(files)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before sending again, for a 503 (1 s without a usable Retry-After);
    None for any other answer."""
    if response.status_code != 503:
        return None
    try:
        return min(max(float(response.headers.get("retry-after", "1")), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:  # an HTTP date, or garbage
        return 1.0


def post(client: httpx.Client, body: dict, retries: int) -> httpx.Response:
    """POST /v1/documents; a 503 is sent again after its Retry-After, up to `retries` times.
    Sending again is safe: a document's id names it, so a repeat replaces it."""
    for _ in range(retries):
        response = client.post("/v1/documents", json=body)
        wait = retry_after(response)
        if wait is None:
            return response
        time.sleep(wait)
    return client.post("/v1/documents", json=body)


def batches(docs: Iterator[dict], max_docs: int, max_chars: int) -> Iterator[list[dict]]:
    batch, size = [], 0
    for doc in docs:
        if batch and (len(batch) >= max_docs or size + len(doc["text"]) > max_chars):
            yield batch
            batch, size = [], 0
        batch.append(doc)
        size += len(doc["text"])
    if batch:
        yield batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a folder, a file, or a .jsonl file")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("RAG_API_KEY"),
        help="sent as `Authorization: Bearer`; default $RAG_API_KEY",
    )
    parser.add_argument("--retries", type=int, default=5, help="503s retried per request")
    parser.add_argument("--batch-docs", type=int, default=32, help="documents per request")
    parser.add_argument("--batch-chars", type=int, default=200_000, help="characters per request")
    parser.add_argument("--max-tokens", type=int, help="chunk size in embedder tokens")
    parser.add_argument("--overlap", type=int, help="chunk overlap in embedder tokens")
    options = parser.parse_args(argv)
    if not options.path.exists():
        parser.error(f"{options.path} does not exist")

    chunking = None
    if options.max_tokens or options.overlap is not None:
        chunking = {"max_tokens": options.max_tokens or 200, "overlap": options.overlap or 0}
    docs = list(documents(options.path))
    if not docs:
        print(f"No .txt, .md, .pdf or JSONL documents under {options.path}", file=sys.stderr)
        return 1
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    ingested = chunks = 0
    start = time.perf_counter()
    with (
        httpx.Client(base_url=options.url, timeout=600, headers=headers) as client,
        tqdm(total=len(docs), unit="doc") as progress,
    ):
        for batch in batches(iter(docs), options.batch_docs, options.batch_chars):
            body = {"collection": options.collection, "documents": batch}
            if chunking:
                body["chunking"] = chunking
            response = post(client, body, options.retries)
            if response.status_code != 200:
                progress.close()
                print(failure(response, options.retries, ingested), file=sys.stderr)
                return 1
            answer = response.json()
            ingested += answer["ingested"]
            chunks += answer["chunks"]
            progress.update(len(batch))
            progress.set_postfix(chunks=chunks)
    elapsed = time.perf_counter() - start
    print(
        f"Ingested {ingested} documents ({chunks} chunks) into '{options.collection}' in "
        f"{elapsed:.1f} s: {ingested / elapsed:.1f} documents/s, {chunks / elapsed:.1f} chunks/s"
    )
    return 0


def failure(response: httpx.Response, retries: int, ingested: int) -> str:
    """What went wrong, and what was stored before it."""
    if response.status_code == 503:
        reason = f"the server was still busy after {retries} retries (503): try again later"
    elif response.status_code == 401:
        reason = "the server needs an API key: pass --api-key or set RAG_API_KEY (401)"
    else:
        reason = f"{response.status_code}: {response.text}"
    return f"Ingest failed, {reason}. {ingested} documents were stored before it."


if __name__ == "__main__":
    sys.exit(main())
