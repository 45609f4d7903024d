"""Exposure through Serve's real proxy: foreign Host names, Serve's control headers, and
connections that send headers and then stall their body."""

import asyncio
import time
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 64}


def test_a_foreign_host_gets_400(client):
    """DNS rebinding: a page on attacker.example resolved to 127.0.0.1 sends its own name."""
    port = urlsplit(str(client.base_url)).port
    for path in ["/v1/collections", "/healthz"]:
        answer = client.get(path, headers={"Host": f"attacker.example:{port}"})
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_host"
    for host in [f"localhost:{port}", f"LOCALHOST:{port}", "127.0.0.1"]:
        assert client.get("/healthz", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        ("x-request-disconnect-disabled", "?1"),  # would keep a slot after the client left
        ("x-request-timeout-seconds", "0"),  # would turn Serve's request timeout off
        ("x-session-id", "pin-me"),
    ],
)
def test_serve_control_headers_are_refused_before_a_slot(client, header):
    """Serve's proxy obeys these before the app sees the request; the Guard's refusal ends
    the request at once, so there is nothing left for them to act on."""
    before = client.get("/v1/status").json()["routes"]["chat"]["admitted"]
    started = time.perf_counter()
    answer = client.post("/v1/chat/completions", json=CHAT, headers=dict([header]))
    assert answer.status_code == 400 and time.perf_counter() - started < 2
    assert answer.json()["error"] == {
        "message": answer.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": header[0],
        "code": "invalid_header",
    }
    assert client.get("/v1/status").json()["routes"]["chat"]["admitted"] == before


async def stall(host: str, port: int, opened: asyncio.Event, count: list[int]) -> bytes:
    """Headers that promise a body, then nothing: what comes back."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
    )
    await writer.drain()
    count[0] += 1
    await opened.wait()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        return head + await asyncio.wait_for(reader.readexactly(length), timeout=10)
    finally:
        writer.close()


def test_stalled_uploads_do_not_hold_the_ingress(server):
    """200 connections that stall their body: probes and requests keep answering, and each
    stalled one gets 408 once `body_timeout_s` (5 s in the test config) has passed."""
    url = urlsplit(server)

    async def scenario() -> tuple[list[bytes], list[float], float]:
        opened, count = asyncio.Event(), [0]
        stalled = [
            asyncio.create_task(stall(url.hostname, url.port, opened, count)) for _ in range(200)
        ]
        while count[0] < 200:
            await asyncio.sleep(0.05)
        opened.set()
        started = time.perf_counter()
        latencies = []
        async with httpx.AsyncClient(base_url=server, timeout=10) as client:
            for _ in range(3):
                for request in [
                    client.get("/healthz"),
                    client.post("/v1/embeddings", json={"input": "still answering"}),
                ]:
                    t0 = time.perf_counter()
                    assert (await request).status_code == 200
                    latencies.append(time.perf_counter() - t0)
        answers = await asyncio.gather(*stalled)
        return answers, latencies, time.perf_counter() - started

    answers, latencies, elapsed = asyncio.run(scenario())
    assert max(latencies) < 3, latencies
    statuses = [a.split(b"\r\n", 1)[0] for a in answers]
    assert statuses.count(b"HTTP/1.1 408 Request Timeout") == 200, set(statuses)
    assert all(b"body_timeout" in a for a in answers)
    assert elapsed < 30
