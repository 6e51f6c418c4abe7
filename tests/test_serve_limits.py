"""serve.py's security and limits, on a server with an API key, one cache row and a queue of one: bad
input gets a 4xx in OpenAI's error body and leaves the server healthy; the key is required everywhere
but /health and the page; a Host that is neither loopback nor --allowed-host gets 403 (DNS rebinding);
CORS headers go only to a --cors-origin (none by default); a body over the limit gets 413 before it is
read; a full queue gets 429 with Retry-After; a client that leaves mid-stream frees its row; SIGTERM
lets the stream in flight finish and exits 0."""

import base64
import json
import socket
import struct
import time
import zlib

import httpx
import pytest
from _infer_fixtures import shared_tiny_release, write_images
from _serve_fixtures import ServerProcess, chat_body, shared_server

KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 300  # max_tokens of the requests that must still be running when the test acts
APP = "https://app.example"  # the server's --cors-origin


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = shared_tiny_release(tmp_path_factory)
    s = ServerProcess(tiny.release, tiny.base, "--batch-size", "1", "--max-queue", "1", "--max-new-tokens", str(LONG),
                      "--max-image-mb", "0.5", "--max-image-pixels", "1000000", "--allowed-host", "Reports.Example",
                      "--allowed-host", "10.0.0.7", "--cors-origin", APP, env={"LLAVARAD_API_KEY": KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits")
    return folder / write_images(folder, 1)[0]


def metric(server, name: str) -> float:
    """A sample of /metrics; 0 for a labelled counter not incremented yet (it is not listed until then)."""
    for line in httpx.get(server.url + "/metrics", headers=AUTH).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    if "{" in name:
        return 0.0
    raise KeyError(name)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def png_bomb() -> bytes:
    """A real decompression bomb: a 1-bit 8000 x 8000 PNG (64 megapixels, 64 MB once decoded to 8 bits) of
    about 10 kB; under PIL's own bomb limit (89 megapixels), so the server's limit is what stops it."""
    w = h = 8_000
    raw = zlib.compressobj(9)
    row = b"\x00" * (1 + w // 8)  # filter byte + packed pixels
    idat = b"".join(raw.compress(row) for _ in range(h)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def with_url(body: dict, url: str) -> dict:
    body["messages"][0]["content"][0]["image_url"]["url"] = url
    return body


def bad_requests(image) -> dict[str, tuple[dict | bytes, int]]:
    png = image.read_bytes()
    ok = chat_body(image, "Cough.")
    two = chat_body(image, "Cough.")
    two["messages"][0]["content"].insert(0, dict(two["messages"][0]["content"][0]))
    b64 = lambda data: "data:image/png;base64," + base64.b64encode(data).decode()  # noqa: E731
    return {
        "not json": (b"{not json", 400),
        "no image": ({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": "Cough."}]}]}, 400),
        "two images": (two, 400),
        "not an image": (with_url(chat_body(image), b64(b"GIF89a this is text, not pixels" * 10)), 400),
        "truncated png": (with_url(chat_body(image), b64(png[: len(png) // 2])), 400),
        "not base64": (with_url(chat_body(image), "data:image/png;base64,@@not*base64@@"), 400),
        "http url": (with_url(chat_body(image), "http://127.0.0.1:9/chest.png"), 400),
        "file url": (with_url(chat_body(image), "file:///etc/passwd"), 400),
        "decompression bomb": (with_url(chat_body(image), b64(png_bomb())), 400),
        "oversized body": (with_url(chat_body(image), b64(b"\x00" * 700_000)), 413),
        "max_tokens 0": ({**ok, "max_tokens": 0}, 400),
        "max_tokens negative": ({**ok, "max_tokens": -3}, 400),
        "max_tokens over the cap": ({**ok, "max_tokens": LONG + 1}, 400),
        "temperature below 0": ({**ok, "temperature": -0.1}, 400),
        "top_p 0": ({**ok, "top_p": 0}, 400),
        "top_p over 1": ({**ok, "top_p": 1.5}, 400),
        "unknown model": ({**ok, "model": "gpt-4o"}, 404),
        "reason too long for a cache row": (chat_body(image, "Cough. " * 400), 400),
        "deeply nested json": (b"[" * 100_000 + b"]" * 100_000, 400),
        "temperature NaN": (json.dumps(ok).replace('"model"', '"temperature": NaN, "model"', 1).encode(), 400),
        "top_p NaN": (json.dumps(ok).replace('"model"', '"top_p": NaN, "model"', 1).encode(), 400),
        "lone surrogate in the reason": (json.dumps(chat_body(image, "Cough \ud800.")).encode(), 400),
    }


def post(server, body: dict | bytes) -> httpx.Response:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=60, **kw)


def test_bad_input_gets_an_openai_error_and_the_server_stays_healthy(server, image):
    for name, (body, status) in bad_requests(image).items():
        r = post(server, body)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] and error["code"], name
        assert httpx.get(server.url + "/health").status_code == 200, name
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json=chat_body(image, "Cough.", max_tokens=4), timeout=60)
    assert r.status_code == 200, r.text  # and it still answers
    assert "Traceback" not in server.stderr()


def test_messages_name_the_problem(server, image):
    cases = bad_requests(image)
    message = lambda name: post(server, cases[name][0]).json()["error"]["message"]  # noqa: E731
    assert "never fetches a URL" in message("http url") and "never fetches a URL" in message("file url")
    assert "over the limit of 1000000 pixels" in message("decompression bomb")
    assert "cannot read image" in message("truncated png")
    assert f"limit of {LONG}" in message("max_tokens over the cap")
    assert "shorten the reason for exam" in message("reason too long for a cache row")
    assert "nests too deeply" in message("deeply nested json")
    assert "temperature must be a finite number" in message("temperature NaN")
    assert "messages[0].content[1].text holds a lone surrogate" in message("lone surrogate in the reason")


def test_body_over_the_limit_by_its_header_gets_413_at_once(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{")
        reply = s.recv(4096)  # answered although almost none of the 10 GB came
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_api_key_is_required_except_for_health_and_the_page(server, image):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/").status_code == 200  # the page asks for the key itself
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"), ("POST", "/v1/preview")):
            r = httpx.request(method, server.url + path, headers=headers, json=chat_body(image) if method == "POST" else None)
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200


def test_a_host_that_is_not_loopback_or_allowed_is_refused(server, tmp_path_factory):
    default = shared_server(shared_tiny_release(tmp_path_factory))  # no --allowed-host
    port = lambda s: s.url.rsplit(":", 1)[1]  # noqa: E731
    for s, extra in ((server, ["reports.example", "REPORTS.example.:443", "10.0.0.7"]), (default, [])):
        for host in ["127.0.0.1", f"127.0.0.1:{port(s)}", f"localhost:{port(s)}", "LOCALHOST", "app.localhost", "[::1]:8000", "127.1.2.3", *extra]:
            r = httpx.get(s.url + "/health", headers={"Host": host})
            assert r.status_code == 200, (host, r.text)
        for host in ["attacker.example", f"attacker.example:{port(s)}", "127.0.0.1.attacker.example", "localhost.attacker.example",
                     "10.0.0.8", "[::2]", "0.0.0.0", "reports.example.attacker.example"]:
            for path in ("/health", "/", "/v1/models", "/metrics"):
                r = httpx.get(s.url + path, headers={"Host": host, **AUTH})
                assert r.status_code == 403, (host, path, r.status_code)
                assert r.json()["error"]["code"] == "host_not_allowed" and "--allowed-host" in r.json()["error"]["message"]
    r = httpx.post(default.url + "/v1/chat/completions", headers={"Host": "attacker.example"}, json={})
    assert r.status_code == 403  # and nothing was read, parsed or queued


def test_cors_headers_only_for_the_allowed_origin(server, tmp_path_factory):
    default = shared_server(shared_tiny_release(tmp_path_factory))  # no --cors-origin
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": APP, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP  # answered before the key is asked
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert httpx.get(server.url + "/v1/models", headers={"Origin": APP, **AUTH}).headers["access-control-allow-origin"] == APP
    assert httpx.get(server.url + "/v1/models", headers={"Origin": APP}).headers["access-control-allow-origin"] == APP  # its 401 too
    for s, origin in ((server, "https://attacker.example"), (default, APP), (default, "http://127.0.0.1:1")):
        for r in (httpx.options(s.url + "/v1/chat/completions", headers={"Origin": origin, **preflight}),
                  httpx.get(s.url + "/v1/models", headers={"Origin": origin, **AUTH}),
                  httpx.get(s.url + "/health", headers={"Origin": origin})):
            cors = [h for h in r.headers if h.lower().startswith("access-control-")]
            assert "access-control-allow-origin" not in cors and (s is server or not cors), (origin, r.headers)


def test_favicon_is_served_without_the_key(server):
    r = httpx.get(server.url + "/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content


def stream_first_chunk(server, body: dict):
    """Open a streaming request and return (client, response, iterator) once its first token arrived."""
    client = httpx.Client(timeout=60)
    response = client.send(client.build_request("POST", server.url + "/v1/chat/completions", headers=AUTH, json={**body, "stream": True}), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    while '"content": ""' in (line := next(lines)) or not line:  # the role chunk, blank separators
        pass
    return client, response, lines


def test_full_queue_gets_429_and_a_client_that_leaves_the_queue_never_runs(server, image):
    body = chat_body(image, "Cough.", max_tokens=LONG)
    started = metric(server, "llavarad_time_to_first_token_seconds_count")  # jobs that got a row
    running = stream_first_chunk(server, body)  # holds the only row
    queued = httpx.Client(timeout=60)
    queued_response = queued.send(queued.build_request("POST", server.url + "/v1/chat/completions", headers=AUTH, json={**body, "stream": True}), stream=True)
    wait_for(lambda: metric(server, "llavarad_queue_length") == 1)
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=60)
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    queued_response.close()  # leaves while waiting
    queued.close()
    running[1].close()
    running[0].close()
    wait_for(lambda: metric(server, "llavarad_queue_length") == 0 and metric(server, "llavarad_active_rows") == 0)
    time.sleep(0.5)  # time enough for the loop to have started the queued job, had it not skipped it
    assert metric(server, "llavarad_time_to_first_token_seconds_count") == started + 1


def test_client_that_leaves_mid_stream_frees_its_row(server, image):
    cancelled = metric(server, 'llavarad_requests_total{outcome="cancelled"}')
    client, response, _ = stream_first_chunk(server, chat_body(image, "Cough.", max_tokens=LONG))
    assert metric(server, "llavarad_active_rows") == 1
    response.close()
    client.close()
    wait_for(lambda: metric(server, "llavarad_active_rows") == 0)
    assert metric(server, 'llavarad_requests_total{outcome="cancelled"}') == cancelled + 1
    tokens = [int(line.split(", ")[1].split()[0]) for line in server.stderr().splitlines() if ": cancelled, " in line]
    assert tokens and tokens[-1] < LONG  # the row stopped early
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json=chat_body(image, max_tokens=3), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(server, image):
    client, response, lines = stream_first_chunk(server, chat_body(image, "Cough.", max_tokens=LONG))
    server.proc.send_signal(15)
    rest = [line for line in lines if line]  # the stream goes on to its end
    client.close()
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)
    assert server.proc.wait(60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
