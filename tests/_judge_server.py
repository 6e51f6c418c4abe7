"""A small OpenAI-compatible judge on the loopback, for the CheXprompt tests and for trying
`evaluate.py --chexprompt` without sending reports anywhere:

    python tests/_judge_server.py [--port 8001]     # then --judge-url http://127.0.0.1:8001/v1

It answers POST /v1/chat/completions and Azure's /openai/deployments/NAME/chat/completions in the
official answer form, from a rule a test can compute by hand: clinically significant A = the
candidate's sentences that are not in the reference, B = the reference's sentences that are not in
the candidate, every other count 0 (sentences: split at ".", stripped, lowercased). A test changes
any answer through `plan` (status, headers, content, a delay, a dropped connection) and reads every
request the server got, with its arrival time.
"""

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

SIGNIFICANT = "Number of clinically significant errors by type:"
INSIGNIFICANT = "Number of clinically insignificant errors by type:"


@dataclass
class Request:
    path: str
    headers: dict  # names lowercased
    body: dict
    at: float  # time.monotonic() on arrival
    reference: str
    candidate: str


@dataclass
class Reply:
    status: int = 200
    headers: dict = field(default_factory=dict)
    content: str | None = None  # the answer text (200); None: the rule's answer
    error: str = "refused"  # the error message (status != 200)
    delay: float = 0.0  # seconds before answering
    drop: bool = False  # close the connection without an answer


def sentences(text: str) -> set[str]:
    return {s.strip().lower() for s in text.split(".") if s.strip()}


def rule_counts(reference: str, candidate: str) -> tuple[list[int], list[int]]:
    """(significant A..F, insignificant A..F) of the rule above."""
    ref, cand = sentences(reference), sentences(candidate)
    return [len(cand - ref), len(ref - cand), 0, 0, 0, 0], [0] * 6


def official_form(significant: list[int], insignificant: list[int]) -> str:
    pairs = lambda counts: "(" + ", ".join(f"({k}, {n})" for k, n in zip("ABCDEF", counts)) + ")"
    return f"{SIGNIFICANT} {pairs(significant)}\n{INSIGNIFICANT} {pairs(insignificant)}"


def reports_of(body: dict) -> tuple[str, str]:
    """The reference and candidate inside the CheXprompt user message."""
    user = body["messages"][-1]["content"]
    rest = user.rpartition('Reference Findings: """')[2]
    reference, _, rest = rest.partition('"""\n\nCandidate Findings: """')
    return reference, rest.rpartition('"""\n\nErrors:')[0]


class JudgeServer:
    """`with JudgeServer(plan) as judge:` serves on judge.url until the block ends."""

    def __init__(self, plan: Callable[[Request, int], Reply | None] | None = None, port: int = 0):
        self.plan = plan or (lambda request, index: None)
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.base = self.url.removesuffix("/v1")

    def __enter__(self) -> "JudgeServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path = self.path.split("?")[0]
                if not (path == "/v1/chat/completions" or (path.startswith("/openai/deployments/") and path.endswith("/chat/completions"))):
                    return self._send(404, {"error": {"message": f"no route {path}"}})
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic(), *reports_of(body))
                with server.lock:
                    index = len(server.requests)
                    server.requests.append(request)
                reply = server.plan(request, index) or Reply()
                time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    return
                if reply.status != 200:
                    return self._send(reply.status, {"error": {"message": reply.error, "type": "test"}}, reply.headers)
                content = reply.content if reply.content is not None else official_form(*rule_counts(request.reference, request.candidate))
                prompt = sum(len(m["content"]) for m in body["messages"]) // 4
                self._send(200, {
                    "id": f"chatcmpl-{index}", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": len(content) // 4, "total_tokens": prompt + len(content) // 4},
                }, reply.headers)

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout, a kill)
                    pass

        return Handler


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8001)
    server = JudgeServer(port=p.parse_args().port)
    print(f"test judge on {server.url} (answers by the rule in tests/_judge_server.py)", flush=True)
    server.httpd.serve_forever()
