"""A real serve.py process on 127.0.0.1 (a free port) over the tiny release, and the requests the
serving tests send to it. Every wait here is bounded."""

import atexit
import base64
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import infer

ROOT = Path(__file__).resolve().parents[1]
NEW = 8  # max_tokens of the tests: short reports keep the tests fast


class ServerProcess:
    """`python serve.py ... --port 0`; the address comes from the line it prints once it serves."""

    def __init__(self, release, base, *args: str, env: dict | None = None, timeout: float = 120.0):
        cmd = [sys.executable, str(ROOT / "serve.py"), "--model", str(release), "--base", str(base), "--port", "0", *args]
        # One thread per process: the tests run several processes on a small shared CPU.
        full_env = {k: v for k, v in os.environ.items() if k != "LLAVARAD_API_KEY"}
        full_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
        self.log: list[str] = []
        found = threading.Event()
        self.url = ""

        def read_stderr():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+)", line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()

        threading.Thread(target=read_stderr, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("serve.py did not start:\n" + "".join(self.log))
        wait_healthy(self.url)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stderr(self) -> str:
        return "".join(self.log)


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never became healthy")


def data_url(path: str | Path, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def chat_body(image: str | Path, reason: str | None = None, max_tokens: int = NEW, **fields) -> dict:
    """A chat-completions body with the image as a data URL and, unless None, the reason as a text part."""
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    if reason is not None:
        content.append({"type": "text", "text": reason})
    return {"model": "llava-rad", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **fields}


def infer_stdout(release, base, image: str | Path, reason: str | None, max_new_tokens: int = NEW, *options: str) -> str:
    """What `python infer.py IMAGE [--reason REASON] --max-new-tokens N [options]` prints, without its final newline."""
    argv = [str(image), "--model", str(release), "--base", str(base), "--max-new-tokens", str(max_new_tokens), "--device", "cpu", *options]
    if reason is not None:
        argv += ["--reason", reason]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert infer.main(argv) == 0
    assert out.getvalue().endswith("\n")
    return out.getvalue()[:-1]


def sse_text(response) -> tuple[str, list[dict], list[str]]:
    """An httpx streaming response -> (concatenated content, the chunks, the raw data lines)."""
    import json

    chunks, lines = [], []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        lines.append(line[6:])
        if line[6:] != "[DONE]":
            chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return text, chunks, lines


_SHARED: ServerProcess | None = None


def shared_server(tiny) -> ServerProcess:
    """One server (4 cache rows) for the test modules that need no special options; stopped at exit."""
    global _SHARED
    if _SHARED is None:
        _SHARED = ServerProcess(tiny.release, tiny.base, "--batch-size", "4", "--max-queue", "32", "--max-new-tokens", "32")
        atexit.register(_SHARED.stop)
    return _SHARED


def png_pixels(data: str | Image.Image, mode: str = "RGB") -> np.ndarray:
    """A data: URL or a PIL image -> its pixels as the PNG holds them, in `mode`."""
    if isinstance(data, Image.Image):
        out = io.BytesIO()
        data.save(out, "PNG")
        data = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    header, _, b64 = data.partition(",")
    assert header == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert(mode))
