"""One chat completion from submit to outcome: the job goes into the engine's queue, its tokens come
back as text and leave as SSE chunks in OpenAI's format (ending with `data: [DONE]`) or as one JSON
body, a client that goes away cancels the job (freeing its cache row at once), and the outcome is
logged and left in the request's scope["state"] for /metrics' count (middleware.Outcomes). What may
enter: a validated ChatRequest and the Job made from it; nothing here calls back into the app."""

import asyncio
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from llavarad.model.tokenizer import Tokenizer
from llavarad.serve.api_error import APIError, outcome_of
from llavarad.serve.chat import ChatRequest
from llavarad.serve.scheduler import Cancelled, Job, Scheduler
from llavarad.serve.stream import TextStream


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class Completion(Response):
    """submit() puts the job in the queue; the ASGI call then runs it to its end as the response."""

    def __init__(self, chat: ChatRequest, job: Job, prompt_tokens: int, tokenizer: Tokenizer):
        super().__init__()
        self.chat, self.job, self.prompt_tokens = chat, job, prompt_tokens
        self.id, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        self.text = TextStream(tokenizer)
        self.outcome, self.completion_tokens = "cancelled", 0

    def submit(self, scheduler: Scheduler) -> "Completion":
        """Queue the job; raises the scheduler's APIError (429 queue full, 503 not running)."""
        scheduler.submit(self.job)
        print(f"request {self.job.key}: image {len(self.chat.image)} B, prompt {self.prompt_tokens} tokens, "
              f"max_tokens {self.chat.max_tokens}, {'stream' if self.chat.stream else 'whole'}", file=sys.stderr)
        return self

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
            self.job.cancel()  # frees the row of a job that is still running; nothing for one that ended
            scope.setdefault("state", {})["outcome"] = self.outcome
            self._log()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.job.cancel()

    def _log(self) -> None:
        job = self.job
        first = f"{job.first_token - job.arrival:.3f}s" if job.first_token else "-"
        print(f"request {job.key}: {self.outcome}, {self.completion_tokens} tokens, first token {first}, "
              f"total {time.monotonic() - job.arrival:.3f}s", file=sys.stderr)

    async def _pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason or None) per token, until the job ends."""
        while True:
            token = await self.job.next()
            self.completion_tokens += 1
            if token.finish is None:
                yield self.text.push(token.id), None
            else:
                piece = self.text.push(token.id) if token.finish == "length" else ""  # "stop": the token is EOS
                yield piece + self.text.finish(), token.finish
                return

    def _failed(self, e: Exception) -> APIError:
        """What ended the job (the model failed, the server stops) as the client's error."""
        error = e if isinstance(e, APIError) else APIError(500, f"generation failed: {e}", "server_error")
        self.outcome = outcome_of(error.status)
        return error

    async def _whole(self, scope: Scope, send: Send) -> None:
        try:
            text, finish = "", None
            async for piece, finish in self._pieces():
                text += piece
        except Cancelled:
            return
        except Exception as e:
            return await self._failed(e).response()(scope, None, send)
        self.outcome = "ok"
        body = {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.chat.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(self.prompt_tokens, self.completion_tokens),
        }
        await JSONResponse(body)(scope, None, send)

    def _chunk(self, delta: dict, finish: str | None) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.chat.model,
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
        except Cancelled:
            return
        except Exception as e:  # headers are sent: the error goes into the stream, as OpenAI does
            await body(_event(self._failed(e).body()))
        else:
            self.outcome = "ok"
            if self.chat.include_usage:
                usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                         "model": self.chat.model, "choices": [],
                         "usage": _usage(self.prompt_tokens, self.completion_tokens)}
                await body(_event(usage))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
