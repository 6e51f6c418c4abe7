"""The FastAPI application: the routes and what every request passes before one. A chat completion
is read, validated and prepared here (image -> pixels, reason -> ids, the cache-row check), then
handed to a Completion, which owns it from submit to outcome. Also: models, health, metrics, the
DICOM preview, per-sentence explanations (run on the decode loop's thread) and the reading-room page.

Security: the Host check, CORS and the API key are middleware (middleware.py). Bodies are read in
chunks and refused with 413 as soon as they pass the limit. Images are decoded (under a pixel limit) and
preprocessed in a small thread pool, never on the event loop. Logs carry ids, sizes and timings:
never an image or a reason for exam.
"""

import asyncio
import io
import json
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from torch import Tensor

from llavarad.explain.relevance import Explanation, explain
from llavarad.infer.generate import Sampling
from llavarad.infer.images import preprocess, read_image
from llavarad.infer.pipeline import prompt_ids
from llavarad.model.prompt import build_question
from llavarad.model.tokenizer import Tokenizer
from llavarad.serve.api_error import APIError
from llavarad.serve.chat import ChatRequest, Limits, parse_chat
from llavarad.serve.completion import Completion
from llavarad.serve.explanation import ExplainRequest, explanation_body, parse_explain
from llavarad.serve.middleware import BearerAuth, HostCheck, Outcomes
from llavarad.serve.prometheus import Metrics
from llavarad.serve.scheduler import Job, Scheduler

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServeConfig:
    served_name: str = "llava-rad"
    api_key: str | None = None
    max_new_tokens: int = 256  # cap and default of max_tokens
    max_image_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000  # a 7000x7000 image; chest X-rays are at most about 4300x3500
    max_len: int = 2048  # cache slots per row: image slots + prompt text + new tokens
    image_workers: int = 4
    explain_problem: str | None = None  # why /v1/explain cannot work with this model (explain.relevance.gradient_problem)
    allowed_hosts: tuple[str, ...] | None = None  # with a tuple: Host must be a loopback name or one of these
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API (CORS); none: no CORS header

    @property
    def max_body_bytes(self) -> int:
        return self.max_image_bytes * 4 // 3 + 64 * 1024  # base64 image + JSON around it


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 from its Content-Length or as soon as the chunks pass `limit`."""
    length = request.headers.get("content-length")
    too_large = APIError(413, f"request body is over the limit of {limit} bytes", "request_too_large")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class Server:
    """The model, tokenizer and decode loop behind the routes; `app` is the FastAPI application."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, image_size: int, n_patches: int, config: ServeConfig, metrics: Metrics):
        self.scheduler, self.tokenizer, self.config, self.metrics = scheduler, tokenizer, config, metrics
        self.image_size, self.n_patches = image_size, n_patches
        self.limits = Limits(config.served_name, config.max_new_tokens, config.max_image_bytes)
        self.images = ThreadPoolExecutor(config.image_workers, thread_name_prefix="image")
        self.app = self._routes()

    def _routes(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            self.scheduler.start()
            yield
            self.scheduler.stop()
            self.images.shutdown(cancel_futures=True)

        app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        if self.config.api_key:  # each add_middleware wraps the ones before: the last is the outermost
            app.add_middleware(BearerAuth, key=self.config.api_key)
        if self.config.cors_origins:
            app.add_middleware(CORSMiddleware, allow_origins=list(self.config.cors_origins), allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type"])
        if self.config.allowed_hosts is not None:
            app.add_middleware(HostCheck, allowed=self.config.allowed_hosts)
        app.add_middleware(Outcomes, metrics=self.metrics)

        @app.exception_handler(APIError)
        async def api_error(request: Request, e: APIError) -> JSONResponse:
            return e.response()

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, e: HTTPException) -> JSONResponse:
            return APIError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "invalid_request").response()

        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/preview")(self.preview)
        app.post("/v1/explain")(self.explain)
        app.get("/v1/models")(self.models)
        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        app.get("/")(lambda: FileResponse(STATIC / "index.html"))
        app.get("/favicon.ico")(lambda: FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml"))
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
        return app

    async def health(self) -> JSONResponse:
        ok = self.scheduler.alive()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.config.served_name, "object": "model", "created": 0, "owned_by": "llavarad"}]}

    async def prometheus(self) -> Response:
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def preview(self, request: Request) -> Response:
        """Image bytes (PNG, JPEG or DICOM) -> the 8-bit picture the model sees, as a PNG at most 1024 px on a side
        (browsers cannot show DICOM)."""
        data = await read_body(request, self.config.max_image_bytes)
        png = await self._off_loop(self._preview_png, data)
        return Response(png, media_type="image/png")

    def _preview_png(self, data: bytes) -> bytes:
        image = read_image(data, "image", self.config.max_pixels)
        image.thumbnail((1024, 1024))
        out = io.BytesIO()
        image.save(out, "PNG")
        return out.getvalue()

    def _prepare(self, chat: ChatRequest) -> tuple[list[int], Tensor]:
        """(prompt ids, pixels (3, S, S)): the slow part of a request, run in the image threads."""
        pixels = preprocess(read_image(chat.image, "image_url", self.config.max_pixels), self.image_size)
        return prompt_ids(self.tokenizer, build_question(chat.reason)), pixels

    async def _off_loop(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.images, fn, *args)
        except ValueError as e:  # read_image's "<name>: cannot read image (...)"
            raise APIError(400, str(e), "invalid_image", "image_url") from None

    async def _json_body(self, request: Request) -> object:
        data = await read_body(request, self.config.max_body_bytes)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
        except RecursionError:  # [[[[...]]]]: Python's parser recurses once per level
            raise APIError(400, "the request body is not valid JSON: it nests too deeply", "invalid_json") from None

    async def explain(self, request: Request) -> JSONResponse:
        """Per-sentence overlays of a report (llavarad/explain/relevance.py), computed on the decode loop's thread between
        decode steps: one teacher-forced forward and a backward per sentence."""
        start = time.monotonic()
        if self.config.explain_problem:
            raise APIError(400, f"explaining a report {self.config.explain_problem}", "explain_unavailable")
        self.scheduler.check()
        req = parse_explain(await self._json_body(request), self.config.max_image_bytes)
        tokens = await self._off_loop(self._explain_tokens, req)
        image = await self._off_loop(read_image, req.image, "image_url", self.config.max_pixels)
        future = self.scheduler.call(lambda: explain(self.scheduler.model, self.tokenizer, image, req.reason, req.findings))
        try:
            expl: Explanation = await asyncio.wrap_future(future)
        except APIError:  # the server stops
            raise
        except ValueError as e:  # the findings cannot be teacher-forced after this prompt
            raise APIError(400, str(e), "invalid_value", "findings") from None
        except Exception as e:  # the model failed
            raise APIError(500, f"the explanation failed: {type(e).__name__}", "server_error") from None
        body = await asyncio.get_running_loop().run_in_executor(self.images, explanation_body, expl, self.image_size)
        print(f"explain: image {len(req.image)} B, {tokens} tokens, {len(expl.sentences)} sentences, "
              f"{time.monotonic() - start:.3f}s", file=sys.stderr)
        return JSONResponse(body)

    def _explain_tokens(self, req: ExplainRequest) -> int:
        """The teacher-forced sequence's length, refused past a cache row's: that bounds the work."""
        tokens = self.scheduler.model.positions(prompt_ids(self.tokenizer, build_question(req.reason), req.findings))
        if tokens > self.config.max_len:
            raise APIError(400, f"the prompt and findings take {tokens} tokens ({self.n_patches} for the image), over the "
                                f"{self.config.max_len} positions of a cache row", "context_length_exceeded", "findings")
        return tokens

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        self.scheduler.check()
        chat = parse_chat(await self._json_body(request), self.limits)
        ids, pixels = await self._off_loop(self._prepare, chat)
        prompt_tokens = self.scheduler.model.positions(ids)
        if prompt_tokens + chat.max_tokens - 1 > self.config.max_len:
            raise APIError(400, f"the prompt takes {prompt_tokens} tokens ({self.n_patches} for the image); with max_tokens "
                                f"{chat.max_tokens} it does not fit the {self.config.max_len} positions of a cache row: "
                                "shorten the reason for exam or lower max_tokens", "context_length_exceeded", "messages")
        seed = chat.seed if chat.seed is not None else secrets.randbits(63)
        job = Job(ids, pixels, chat.max_tokens, Sampling(chat.temperature, chat.top_p, seed), arrival)
        return Completion(chat, job, prompt_tokens, self.tokenizer).submit(self.scheduler)
