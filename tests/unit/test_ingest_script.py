"""scripts/ingest.py: what it reads from a folder or a JSONL file, how it batches, and how it
sends (API key, retries after 503)."""

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def test_links_out_of_the_folder_are_not_followed(tmp_path):
    root, outside = tmp_path / "docs", tmp_path / "secrets"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "id_rsa.txt").write_text("PRIVATE KEY")
    (root / "a.txt").write_text("inside")
    (root / "sub" / "b.md").write_text("inside too")
    (root / "leak.txt").symlink_to(outside / "id_rsa.txt")
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    (root / "alias.txt").symlink_to(root / "sub" / "b.md")  # stays inside: kept
    docs = list(ingest.documents(root))
    assert [d["id"] for d in docs] == ["a.txt", "alias.txt", "sub/b.md"]
    assert all("PRIVATE" not in d["text"] for d in docs)


class Server:
    """A local HTTP server answering POST /v1/documents from a script of (status, headers)."""

    def __init__(self, answers: list[tuple[int, dict]]) -> None:
        self.answers, self.requests = list(answers), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((dict(self.headers), body))
                status, headers = server.answers.pop(0) if server.answers else (200, {})
                payload = {"ingested": len(body["documents"]), "chunks": 1}
                data = json.dumps(payload if status == 200 else {"error": {}}).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    return tmp_path


def run(server: Server, folder: Path, *extra: str) -> int:
    try:
        return ingest.main([str(folder), "--collection", "c", "--url", server.url, *extra])
    finally:
        server.close()


def test_the_api_key_is_sent_from_the_flag_or_the_environment(folder, monkeypatch):
    monkeypatch.setenv("RAG_API_KEY", "from-env")
    server = Server([])
    assert run(server, folder) == 0
    assert server.requests[0][0]["Authorization"] == "Bearer from-env"
    server = Server([])
    assert run(server, folder, "--api-key", "from-flag") == 0
    assert server.requests[0][0]["Authorization"] == "Bearer from-flag"
    monkeypatch.delenv("RAG_API_KEY")
    server = Server([(401, {})])
    assert run(server, folder) == 1
    assert "Authorization" not in server.requests[0][0]


def test_503_is_retried_after_its_retry_after(folder, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(ingest.time, "sleep", waits.append)
    server = Server([(503, {"Retry-After": "3"}), (503, {"Retry-After": "soon"})])
    assert run(server, folder) == 0
    assert waits == [3.0, 1.0]  # an unreadable Retry-After waits 1 s
    assert len(server.requests) == 3 and server.requests[2][1] == server.requests[0][1]


def test_retries_are_bounded_then_explained(folder, monkeypatch, capsys):
    waits: list[float] = []
    monkeypatch.setattr(ingest.time, "sleep", waits.append)
    server = Server([(503, {"Retry-After": "86400"})] * 10)
    assert run(server, folder, "--retries", "2") == 1
    assert len(server.requests) == 3  # the first try and two more
    assert waits == [ingest.MAX_RETRY_AFTER_S] * 2  # a day's Retry-After is capped
    assert "still busy after 2 retries" in capsys.readouterr().err
