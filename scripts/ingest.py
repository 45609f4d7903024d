"""Ingest a folder of .txt, .md and .pdf files, or a JSONL file, through the HTTP API.

    .venv/bin/python scripts/ingest.py PATH --collection NAME [--url http://127.0.0.1:8000]

A file's id is its path relative to PATH (a JSONL line's `id`, or the hash of its `text`), so
running it again replaces documents instead of duplicating them. JSONL lines are
`{"id"?, "text", "metadata"?}`. Prints documents/s and chunks/s at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from tqdm import tqdm

SUFFIXES = {".txt", ".md", ".pdf"}


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
    files = [source] if source.is_file() else sorted(source.rglob("*"))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a folder, a file, or a .jsonl file")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--batch-docs", type=int, default=32, help="documents per request")
    parser.add_argument("--batch-chars", type=int, default=200_000, help="characters per request")
    parser.add_argument("--max-tokens", type=int, help="chunk size in embedder tokens")
    parser.add_argument("--overlap", type=int, help="chunk overlap in embedder tokens")
    options = parser.parse_args()
    if not options.path.exists():
        parser.error(f"{options.path} does not exist")

    chunking = None
    if options.max_tokens or options.overlap is not None:
        chunking = {"max_tokens": options.max_tokens or 200, "overlap": options.overlap or 0}
    docs = list(documents(options.path))
    if not docs:
        print(f"No .txt, .md, .pdf or JSONL documents under {options.path}", file=sys.stderr)
        return 1
    ingested = chunks = 0
    start = time.perf_counter()
    with (
        httpx.Client(base_url=options.url, timeout=600) as client,
        tqdm(total=len(docs), unit="doc") as progress,
    ):
        for batch in batches(iter(docs), options.batch_docs, options.batch_chars):
            body = {"collection": options.collection, "documents": batch}
            if chunking:
                body["chunking"] = chunking
            response = client.post("/v1/documents", json=body)
            if response.status_code != 200:
                progress.close()
                print(f"Ingest failed ({response.status_code}): {response.text}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
