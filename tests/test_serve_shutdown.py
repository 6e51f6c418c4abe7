"""SIGTERM with a short --shutdown-grace while many requests are open: every stream the server ends early
(running, or still waiting for a row) ends with an SSE error event and then `data: [DONE]`; a request
still waiting that has not started its answer gets 503 with Retry-After; the log holds no traceback;
the process exits 0. A real server process on 127.0.0.1."""

import json
import threading
import time

import httpx
import pytest
from _infer_fixtures import shared_tiny_release, write_images
from _serve_fixtures import ServerProcess, chat_body

ROWS, WAITING_STREAMS, WAITING_WHOLE = 4, 12, 4
LONG = 4000  # max_tokens: far more than the grace lets any row write


@pytest.fixture
def setup(tmp_path_factory):
    tiny = shared_tiny_release(tmp_path_factory)
    folder = tmp_path_factory.mktemp("shutdown")
    image = folder / write_images(folder, 1)[0]
    server = ServerProcess(tiny.release, tiny.base, "--batch-size", str(ROWS), "--max-queue", "32",
                           "--max-new-tokens", str(LONG), "--shutdown-grace", "0.3")
    yield server, image
    server.stop()


def gauge(server, name: str) -> float:
    lines = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
    return float(next(line.split()[1] for line in lines if line.startswith(name + " ")))


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Stream(threading.Thread):
    """One streaming request read to its end on a thread of its own; `lines` are its data lines."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body, self.lines, self.error = url, body, [], None
        self.first_token = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json={**self.body, "stream": True}, timeout=120) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line.removeprefix("data: "))
                        if '"content": "' in line and '"content": ""' not in line:
                            self.first_token.set()
        except Exception as e:  # a cut stream: httpx says the chunked body ended early
            self.error = e


class Whole(threading.Thread):
    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body, self.response, self.error = url, body, None, None

    def run(self) -> None:
        try:
            self.response = httpx.post(self.url + "/v1/chat/completions", json=self.body, timeout=120)
        except Exception as e:
            self.error = e


def test_sigterm_with_a_short_grace_ends_every_request_cleanly(setup):
    server, image = setup
    body = chat_body(image, "Cough.", max_tokens=LONG)
    running = [Stream(server.url, body) for _ in range(ROWS)]
    for s in running:
        s.start()
    for s in running:
        assert s.first_token.wait(60), "a row never started"
    waiting = [Stream(server.url, body) for _ in range(WAITING_STREAMS)] + [Whole(server.url, body) for _ in range(WAITING_WHOLE)]
    for w in waiting:
        w.start()
    wait_for(lambda: gauge(server, "llavarad_queue_length") == WAITING_STREAMS + WAITING_WHOLE)

    server.proc.send_signal(15)
    assert server.proc.wait(60) == 0
    for t in running + waiting:
        t.join(30)
    for s in running + waiting[:WAITING_STREAMS]:
        assert s.error is None, f"{type(s.error).__name__}: {s.error}"
        assert s.lines[-1] == "[DONE]"
        error = json.loads(s.lines[-2])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error" and "shutting down" in error["message"]
    for w in waiting[WAITING_STREAMS:]:
        assert w.error is None, f"{type(w.error).__name__}: {w.error}"
        assert w.response.status_code == 503 and w.response.headers["retry-after"] == "1"
        assert w.response.json()["error"]["code"] == "shutting_down"
    log = server.stderr()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
