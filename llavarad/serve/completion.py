"""One chat completion as an ASGI response: the job's tokens turned into text and sent as SSE chunks
in OpenAI's format (ending with `data: [DONE]`) or as one JSON body. While it waits it watches the
connection, so a client that goes away cancels its job and frees the cache row at once."""

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from llavarad.infer.generate import Token
from llavarad.model.tokenizer import Tokenizer
from llavarad.serve.chat import ChatRequest
from llavarad.serve.errors import APIError
from llavarad.serve.scheduler import Job, Scheduler
from llavarad.serve.stream import TextStream


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class Completion(Response):
    """Runs one job to its end as the response: SSE chunks or one JSON body. Watches the connection
    while it waits, so a client that goes away frees its row at once."""

    def __init__(self, job: Job, events: asyncio.Queue, chat: ChatRequest, prompt_tokens: int, tokenizer: Tokenizer,
                 model_name: str, scheduler: Scheduler, on_end: Callable[["Completion"], None]):
        super().__init__()
        self.job, self.events, self.chat, self.prompt_tokens = job, events, chat, prompt_tokens
        self.model_name, self.scheduler, self.on_end = model_name, scheduler, on_end
        self.id, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        self.text = TextStream(tokenizer)
        self.outcome, self.completion_tokens = "cancelled", 0  # what on_end reports

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        try:
            if self.chat.stream:
                await self._stream(send)
            else:
                await self._whole(scope, send)
        except OSError:  # the client went away while we were sending
            pass
        finally:
            watcher.cancel()
            self.scheduler.cancel(self.job)  # no-op for a job that ended
            self.on_end(self)

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.events.put_nowait(ConnectionAbortedError("client disconnected"))

    async def _pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason or None) per token, until the job ends."""
        while True:
            item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            token: Token = item
            self.completion_tokens += 1
            if token.finish is None:
                yield self.text.push(token.id), None
            else:
                piece = self.text.push(token.id) if token.finish == "length" else ""  # "stop": the token is EOS
                yield piece + self.text.finish(), token.finish
                return

    async def _whole(self, scope: Scope, send: Send) -> None:
        try:
            text, finish = "", None
            async for piece, finish in self._pieces():
                text += piece
        except ConnectionAbortedError:
            return
        except Exception as e:
            self.outcome = "server_error"
            error = APIError(500, f"generation failed: {e}", "server_error")
            return await JSONResponse(error.body(), 500)(scope, None, send)
        self.outcome = "ok"
        body = {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(self.prompt_tokens, self.completion_tokens),
        }
        await JSONResponse(body)(scope, None, send)

    def _chunk(self, delta: dict, finish: str | None) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_name,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return _event(chunk)

    async def _stream(self, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = lambda data: send({"type": "http.response.body", "body": data, "more_body": True})  # noqa: E731
        await body(self._chunk({"role": "assistant", "content": ""}, None))
        try:
            async for piece, finish in self._pieces():
                if piece:
                    await body(self._chunk({"content": piece}, None))
                if finish is not None:
                    await body(self._chunk({}, finish))
        except ConnectionAbortedError:
            return
        except Exception as e:  # headers are sent: the error goes into the stream, as OpenAI does
            self.outcome = "server_error"
            await body(_event(APIError(500, f"generation failed: {e}", "server_error").body()))
        else:
            self.outcome = "ok"
            if self.chat.include_usage:
                usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                         "model": self.model_name, "choices": [],
                         "usage": _usage(self.prompt_tokens, self.completion_tokens)}
                await body(_event(usage))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
