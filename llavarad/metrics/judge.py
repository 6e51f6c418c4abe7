"""CheXprompt's judge: the requests to an OpenAI-compatible chat API (OpenAI, Azure OpenAI, a local
vLLM / llama.cpp / Ollama server), concurrent under a requests-per-minute limit, and resumable.

What each answer leads to:
  - 200: parsed as the official parser does; an answer it cannot read is asked again (`retries`,
    official: 1), then the rating fails (null, with the reason);
  - 429, 408, 409, 5xx, a timeout or a dropped connection: asked again after Retry-After (or
    retry-after-ms), else an exponential backoff; a judge still failing after `attempts` tries
    stops the run;
  - 401 / 403 (the key) or 404 (the model, or a URL that is no chat API): the run stops;
  - any other 4xx, e.g. 400 for a prompt a content filter refused: that rating fails, the run goes on;
  - no connection before the judge has answered anything: the run stops at once.
A stop is one JudgeStopped line; every rating that arrived is in chexprompt.jsonl (ratings.py).
"""

import asyncio
import email.utils
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from tqdm import tqdm

from llavarad.errors import first_line
from llavarad.jsonl import Appender
from llavarad.metrics.chexprompt import PROMPT_ID, SAMPLING, messages, parse_answer
from llavarad.metrics.ratings import FILE, read_ratings, reusable, rewrite

try:
    import openai
except ImportError:  # the judge extra is not installed: said when a request is due
    openai = None

RETRY_STATUS = {408, 409, 429}  # and every 5xx
NEEDS_OPENAI = "--chexprompt needs the openai package (>= 1): pip install 'llavarad[judge]'"


class JudgeStopped(Exception):
    """The run cannot go on (key, model, an unreachable judge); the message is one line."""


@dataclass
class JudgeSettings:
    model: str  # the judge model, or the Azure deployment name
    url: str | None = None  # OpenAI-compatible base URL; None: OpenAI's (or OPENAI_BASE_URL)
    api_version: str | None = None  # given: `url` is an Azure OpenAI endpoint
    temperature: float = SAMPLING["temperature"]
    top_p: float = SAMPLING["top_p"]
    max_tokens: int = SAMPLING["max_tokens"]
    retries: int = 1  # asks again after an answer the parser cannot read (official: 1)
    concurrency: int = 8  # requests in flight
    rpm: float = 30.0  # request starts per minute (official: 30); 0: no limit
    timeout: float = 300.0  # seconds for one answer
    attempts: int = 8  # tries of one request through 429 / 5xx / timeouts / dropped connections
    backoff: float = 1.0  # seconds before the 2nd try without Retry-After, doubling, at most 60

    def fingerprint(self) -> dict:
        """What made a rating: a rerun reuses it only when this is unchanged."""
        return {"model": self.model, "prompt": PROMPT_ID, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens}


def make_client(s: JudgeSettings) -> "openai.AsyncOpenAI":
    """An AsyncOpenAI (or AsyncAzureOpenAI) client without retries of its own: the Judge does them.
    The key comes from the environment only; a judge at a URL of one's own may want none."""
    if openai is None or not hasattr(openai, "AsyncOpenAI"):
        raise ValueError(NEEDS_OPENAI)
    azure = s.api_version is not None
    key = (os.environ.get("AZURE_OPENAI_API_KEY") if azure else None) or os.environ.get("OPENAI_API_KEY")
    if not key:
        if s.url is None or azure:
            names = "AZURE_OPENAI_API_KEY or OPENAI_API_KEY" if azure else "OPENAI_API_KEY"
            raise ValueError(f"--chexprompt: set {names} in the environment (a key is never taken from the command line)")
        key = "none"  # a local server; one that wants a key answers 401, which says so
    if azure:
        return openai.AsyncAzureOpenAI(azure_endpoint=s.url, api_version=s.api_version, api_key=key, timeout=s.timeout, max_retries=0)
    return openai.AsyncOpenAI(base_url=s.url, api_key=key, timeout=s.timeout, max_retries=0)


@dataclass
class Reply:
    text: str | None  # the answer's content (None: a refused prompt, or no content)
    tries: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refused: str | None = None  # why the judge refused the prompt (a 4xx other than 401/403/404)


class Judge:
    """One run's client, rate limit and retries. `rate` gives the fields of one ratings line."""

    def __init__(self, settings: JudgeSettings, client: "openai.AsyncOpenAI", say: Callable[[str], None]):
        self.s, self.client, self.say = settings, client, say
        self.host = client.base_url.host or str(client.base_url)
        self.gap = 60.0 / settings.rpm if settings.rpm else 0.0
        self.next_start = 0.0
        self.answered = False  # any answer at all: a connection error after one is a blip, retried
        self.requests = 0

    async def _turn(self) -> None:
        """Request starts at least 60 / rpm seconds apart, whatever the concurrency (one event loop:
        no other task runs between reading and moving `next_start`)."""
        now = asyncio.get_running_loop().time()
        start = max(now, self.next_start)
        self.next_start = start + self.gap
        if start > now:
            await asyncio.sleep(start - now)

    async def ask(self, chat: list[dict[str, str]]) -> Reply:
        """One request, tried again through transient failures; JudgeStopped when it cannot be had."""
        attempt = 0
        while True:
            attempt += 1
            await self._turn()
            self.requests += 1
            try:
                r = await self.client.chat.completions.create(
                    model=self.s.model, messages=chat, temperature=self.s.temperature, top_p=self.s.top_p,
                    max_tokens=self.s.max_tokens, frequency_penalty=0.0, presence_penalty=0.0)
            except openai.APIStatusError as e:
                status = e.status_code
                if status in (401, 403):
                    raise JudgeStopped(f"the judge at {self.host} refused the key ({first_line(e)}); set OPENAI_API_KEY "
                                       "(Azure: AZURE_OPENAI_API_KEY) to a key it takes") from None
                if status == 404:
                    raise JudgeStopped(f"the judge at {self.host} has no model {self.s.model!r}, or --judge-url is not an "
                                       f"OpenAI-compatible API ({first_line(e)})") from None
                if status not in RETRY_STATUS and status < 500:
                    self.answered = True
                    return Reply(None, attempt, refused=f"refused by the judge ({first_line(e)})")
                why, wait = f"HTTP {status}", retry_after(e.response.headers)
            except openai.APIConnectionError as e:  # APITimeoutError is one too
                if refused_connection(e) and not self.answered:
                    raise JudgeStopped(f"cannot reach the judge at {self.client.base_url} ({first_line(e.__cause__)})") from None
                why, wait = ("no answer in time" if isinstance(e, openai.APITimeoutError) else first_line(e.__cause__ or e)), None
            else:
                self.answered = True
                usage = r.usage
                text = r.choices[0].message.content if r.choices else None
                return Reply(text, attempt, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
            if attempt == self.s.attempts:
                raise JudgeStopped(f"the judge at {self.host} did not answer in {attempt} tries (last: {why})")
            wait = min(60.0, self.s.backoff * 2 ** (attempt - 1)) if wait is None else wait
            self.say(f"judge: {why}; asking again in {wait:.1f} s (try {attempt + 1} of {self.s.attempts})")
            await asyncio.sleep(wait)

    async def rate(self, reference: str, candidate: str) -> dict:
        """{"rating", "answer", "error"?, "usage"} for one report: asked again while the answer
        does not parse, `retries` times."""
        chat = messages(reference, candidate)
        usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        answer = None
        for _ in range(1 + self.s.retries):
            reply = await self.ask(chat)
            usage["requests"] += reply.tries
            usage["prompt_tokens"] += reply.prompt_tokens
            usage["completion_tokens"] += reply.completion_tokens
            if reply.refused:
                return {"rating": None, "answer": None, "error": reply.refused, "usage": usage}
            answer = reply.text
            rating = parse_answer(answer)
            if rating is not None:
                return {"rating": rating, "answer": answer, "usage": usage}
        return {"rating": None, "answer": answer, "usage": usage,
                "error": f"no answer the official parser reads, in {1 + self.s.retries} tries"}


def refused_connection(e: Exception) -> bool:
    """The client never got a connection (refused, no such host): httpx's ConnectError behind the
    openai error, by name, since openai releases differ in which httpx they carry."""
    return any(c.__name__ == "ConnectError" for c in type(e.__cause__).__mro__)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait the server asked for: retry-after-ms, or Retry-After in seconds or as a date."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return None


async def _rate_all(judge: Judge, todo: list[tuple[str, str]], on_line: Callable[[str, str, dict], None]) -> None:
    """`concurrency` workers take pairs off one queue; the first stop cancels the rest."""
    queue = deque(todo)

    async def worker() -> None:
        while queue:
            reference, candidate = queue.popleft()
            on_line(reference, candidate, await judge.rate(reference, candidate))

    tasks = [asyncio.create_task(worker()) for _ in range(min(judge.s.concurrency, len(todo)))]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        failures = [t.exception() for t in done if t.exception() is not None]  # each one read, so asyncio keeps quiet
        if failures:
            raise failures[0]
    finally:
        await judge.client.close()


@dataclass
class RatingRun:
    lines: list[dict]  # one ratings line per report, in prediction order
    asked: int  # report pairs sent to the judge in this run
    reused: int  # reports whose rating came from the earlier file
    requests: int  # HTTP requests made in this run
    host: str | None  # where the reports went (None: nothing was sent)


def rate_reports(ids: list, references: list[str], candidates: list[str], settings: JudgeSettings,
                 output_dir: str | Path) -> RatingRun:
    """Every report's rating, reusing those of OUTPUT_DIR/chexprompt.jsonl that still hold and
    asking the judge for the rest (each distinct reference / candidate pair once)."""
    path = Path(output_dir) / FILE
    judge_id = settings.fingerprint()
    earlier = reusable(read_ratings(path), judge_id)
    pairs = list(zip(references, candidates))
    todo = [p for p in dict.fromkeys(pairs) if p not in earlier]
    reused = sum(p in earlier for p in pairs)
    first_id = {}
    for i, p in zip(ids, pairs):
        first_id.setdefault(p, i)
    new: dict[tuple[str, str], dict] = {}
    judge = None
    if todo:
        bar = tqdm(total=len(todo), desc="CheXprompt", unit="report", file=sys.stderr, disable=None)
        judge = Judge(settings, make_client(settings), lambda text: bar.write(text, file=sys.stderr))
        note = f" as {len(todo)} pairs (a repeated pair once)" if len(todo) < len(pairs) - reused else ""
        note += f"; {reused} ratings reused from {path}" if reused else ""
        bar.write(f"CheXprompt: sending the reference and generated findings of {len(pairs) - reused} reports to "
                  f"{judge.host} (model {settings.model}){note}", file=sys.stderr)
        appender = Appender(path, ensure_ascii=False)

        def on_line(reference: str, candidate: str, fields: dict) -> None:
            line = {"id": first_id[(reference, candidate)], "reference": reference, "candidate": candidate,
                    "rating": fields.pop("rating"), "judge": judge_id, **fields}
            appender.write(line)
            new[(reference, candidate)] = line
            bar.update()

        try:
            asyncio.run(_rate_all(judge, todo, on_line))
        except JudgeStopped as e:
            kept = f"; the {len(new)} ratings that arrived are kept in {path}, and a rerun asks only for the others" if new else ""
            raise JudgeStopped(f"{e}{kept}") from None
        finally:
            appender.close()
            bar.close()
    else:
        print(f"CheXprompt: all {len(pairs)} ratings reused from {path}; nothing sent", file=sys.stderr)
    by_pair = {**earlier, **new}
    lines = [{**by_pair[p], "id": i} for i, p in zip(ids, pairs)]
    rewrite(path, lines)
    return RatingRun(lines, len(todo), reused, judge.requests if judge else 0,
                     judge.host if judge else None)
