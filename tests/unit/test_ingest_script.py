"""scripts/ingest.py: what it reads from a folder or a JSONL file, and how it batches."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ingest", ROOT / "scripts" / "ingest.py")
ingest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ingest)


def test_folder_documents_have_stable_ids(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Title\nSome text.")
    (tmp_path / "sub" / "b.txt").write_text("Other text.")
    (tmp_path / "empty.txt").write_text("   ")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs = list(ingest.documents(tmp_path))
    assert [d["id"] for d in docs] == ["a.md", "sub/b.txt"]
    assert docs[1]["metadata"] == {"source": "sub/b.txt", "type": "txt"}
    assert [d["id"] for d in ingest.documents(tmp_path)] == ["a.md", "sub/b.txt"]  # re-run


def test_jsonl_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "x", "text": "hello"}) + "\n\n" + json.dumps({"text": "y"}))
    assert [d.get("id") for d in ingest.documents(path)] == ["x", None]
    path.write_text(json.dumps({"id": "x"}))
    with pytest.raises(SystemExit):
        list(ingest.documents(path))


def test_batches_respect_both_limits():
    docs = [{"text": "a" * 10} for _ in range(7)]
    assert [len(b) for b in ingest.batches(iter(docs), max_docs=3, max_chars=1000)] == [3, 3, 1]
    assert [len(b) for b in ingest.batches(iter(docs), max_docs=10, max_chars=25)] == [2, 2, 2, 1]
