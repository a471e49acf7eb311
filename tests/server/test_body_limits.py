"""Limits before work, against real servers: bodies refused before they are read or tokenized whole, the
in-flight body budget (503 + Retry-After), and memory bounded under many big bodies at once."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.memory import Trimmer, rss_bytes
from tests.server.conftest import ServerProcess
from tests.support import WIKI

TEXT = (WIKI / "test.txt").read_text(encoding="utf-8")
SCORE_LIMIT = 1000
BUDGET = 400_000


@pytest.fixture(scope="module")
def limited(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server scoring at most SCORE_LIMIT tokens per request, holding at most 64 MiB of bodies."""
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "limited.log",
                         env={"CHIAR_MAX_SCORE_TOKENS": str(SCORE_LIMIT), "CHIAR_MAX_INFLIGHT_BODY_BYTES": str(64 * 2**20)}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def small_budget(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("logs") / "budget.log",
                         env={"CHIAR_MAX_INFLIGHT_BODY_BYTES": str(BUDGET)}).start()
    yield proc
    proc.stop()


def open_request(url: str, path: str, declared: int, sent: bytes, content_type: str = "application/json") -> socket.socket:
    """A request whose headers promise `declared` body bytes, of which only `sent` are sent so far."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {declared}\r\n\r\n".encode()
                 + sent)
    return sock


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            dict(h.split(": ", 1) for h in data.partition(b"\r\n\r\n")[0].decode().split("\r\n")[1:]).get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (h.split(": ", 1) for h in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def error(r: httpx.Response, status: int, param: str, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    return err["message"]


def test_text_body_over_the_token_bound_is_refused_before_it_is_read(limited: ServerProcess) -> None:
    """100 MB announced, nothing sent: 413 at once, naming the bound derived from --max-score-tokens."""
    with open_request(limited.url, "/v1/perplexity/text", 100_000_000, b"", "text/plain") as sock:
        status, _, body = read_reply(sock)
    assert status == 413 and body["error"]["code"] == "body_too_large", body
    assert f"--max-score-tokens {SCORE_LIMIT} tokens" in body["error"]["message"], body


def test_texts_over_the_limits_are_refused_before_tokenizing(limited: ServerProcess) -> None:
    big = TEXT[:900_000]
    with httpx.Client(base_url=limited.url, timeout=60) as client:
        message = error(client.post("/v1/generate", json={"prompt": big}), 400, "prompt", "context_length_exceeded")
        assert message.startswith("prompt: is at least ") and "the context holds 128" in message
        error(client.post("/v1/completions", json={"prompt": ["hi", big]}), 400, "prompt", "context_length_exceeded")
        ids = error(client.post("/v1/completions", json={"prompt": [5] * 200_000}), 400, "prompt", "context_length_exceeded")
        assert "200000 tokens" in ids
        error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": big}]}), 400, "messages",
              "context_length_exceeded")
        for path, field in (("/v1/perplexity", "text"), ("/v1/tokenize", "text"), ("/tokenize", "prompt")):
            message = error(client.post(path, json={field: big}), 400, field, "too_many_tokens")
            assert f"at most {SCORE_LIMIT} (the server's --max-score-tokens)" in message, message
        # several texts count together
        error(client.post("/v1/perplexity", json={"text": [TEXT[:3000]] * 4}), 400, "text", "too_many_tokens")
        # within the limits all of them still work
        assert client.post("/v1/perplexity", json={"text": TEXT[:1500]}).status_code == 200
        assert client.post("/tokenize", json={"prompt": TEXT[:1500]}).status_code == 200


def test_a_text_that_cannot_be_cut_into_pieces_is_refused(client: httpx.Client) -> None:
    """Within the token bound (the shared server scores 2M tokens) but 90,000 characters with no whitespace."""
    message = error(client.post("/v1/perplexity", json={"text": "word " * 20 + "x" * 90_000}), 400, "text", "run_too_long")
    assert message.startswith("text: has more than 65536 characters from character 99 without whitespace"), message


def test_many_big_bodies_stay_within_a_bounded_memory(limited: ServerProcess) -> None:
    """16 concurrent 1 MiB texts over the scoring limit. Tokenizing each whole took ~150 MB apiece (the issue:
    30 MB -> 5.4 GB); refused on bounds and pieces they add little."""
    body = json.dumps({"text": TEXT[:1_000_000]}).encode()
    pid = limited.pid
    before = rss(pid)
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss(pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    statuses: list[int] = []

    def send() -> None:
        statuses.append(httpx.post(limited.url + "/v1/perplexity", content=body, headers={"content-type": "application/json"},
                                   timeout=120).status_code)

    senders = [threading.Thread(target=send) for _ in range(16)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    done.set()
    watcher.join()
    assert statuses == [400] * 16
    assert peak[0] - before < 250, (before, peak[0])


def rss(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / 2**20


def test_in_flight_bodies_share_one_budget(small_budget: ServerProcess) -> None:
    """A body that would push the held bytes past --max-inflight-body-bytes waits for none: 503 + Retry-After;
    once the first request answers its bytes are free again."""
    first_body = json.dumps({"prompt": "x " * 149_990}).encode()
    first = open_request(small_budget.url, "/v1/generate", len(first_body), first_body[:1000])
    try:
        second = json.dumps({"prompt": "y " * 60_000}).encode()
        r = httpx.post(small_budget.url + "/v1/generate", content=second, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "overloaded" and "--max-inflight-body-bytes" in r.json()["error"]["message"]
        first.sendall(first_body[1000:])
        status, _, _ = read_reply(first)
        assert status == 400  # over the context: the point is that it was read and answered
    finally:
        first.close()
    r = httpx.post(small_budget.url + "/v1/generate", content=second, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    # one body larger than the whole budget can never be held: 413 naming the setting
    too_big = httpx.post(small_budget.url + "/v1/generate", content=b" " * (BUDGET + 1), headers={"content-type": "application/json"},
                         timeout=30)
    assert too_big.status_code == 413 and "--max-inflight-body-bytes" in too_big.json()["error"]["message"]


def test_malloc_trim_gives_freed_heap_back() -> None:
    """Freed 64 KiB blocks with live neighbours stay in glibc's heap; one trim returns them to the OS."""
    trimmer = Trimmer()
    assert trimmer.available
    blocks = [bytearray(65536) for _ in range(4000)]  # 250 MiB below the mmap threshold: heap, not mmap
    for block in blocks:
        block[::4096] = b"\x01" * 16  # touch every page
    keep = blocks[::50]  # live blocks pin the heap: free memory stays in the middle
    del blocks
    held = rss_bytes()
    after = trimmer.trim_now()
    assert held - after > 150 * 2**20, (held, after)
    assert keep
