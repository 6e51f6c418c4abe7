"""KV-cached decoding: prefill() prompts (right-padded there, where the batch forms) into cache rows,
then decode_step() one token at a time, with continuous batching over a stream of prompts.

Rows of different prompt lengths share one cache: row b's prompt fills slots 0..len_b-1, and its
t-th new token goes to slot len_b + t (see llama.py), so no row ever attends to another row's
padding and a prompt's output does not depend on what it is batched with.

BatchGenerator keeps a fixed number of cache rows busy. When a row emits EOS (or reaches its
max_new_tokens) it is freed and the next prompt is prefilled into it, so a finished report stops
costing compute and a batch never waits for its longest report. Built with `sample=True`, each row
has its own sampling (greedy, or temperature / top-p with a seed: see sampling.py), applied inside
the batched step, so greedy and sampled prompts share a batch; without it every row is an argmax
and the step does no sampling work. Two ways to drive it:
  - `run(prompts, max_new_tokens)`: a stream of prompts in, each prompt's tokens out (infer.py);
  - `add(prompts)` / `step()` / `cancel(key)`: prompts arrive whenever, every token is handed out
    as it is made, and a row can be dropped mid-report (the server's decode loop).
The decode step always runs on the whole batch, so its shapes never change and it can be recorded
once as a CUDA graph (optionally after torch.compile). Each BatchGenerator makes its own cache and
passes it into every model call, so generators over one model never share state. Rows left idle sit at position 0: with
flash-attn they read one cache slot; their share of the weight reads, which dominate a decode
step, is free.
"""

from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

import torch
from torch import Tensor

from llavarad.infer.sampling import choose
from llavarad.model.llama import KVCache, Llama


class RowSampling(NamedTuple):
    """Per-row sampling parameters, (B,) each: temperature (0 = greedy), top_p, seed (int64)."""

    temperature: Tensor
    top_p: Tensor
    seed: Tensor


@dataclass(frozen=True)
class Sampling:
    """One prompt's sampling: greedy by default."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Prompt(NamedTuple):
    key: Hashable
    embeds: Tensor  # (T, dim)
    max_new_tokens: int
    sampling: Sampling = Sampling()


class Token(NamedTuple):
    key: Hashable
    id: int
    finish: str | None  # None: more follow; "stop": id is EOS; "length": the prompt's last token


Step = Callable[[Tensor, Tensor, RowSampling], Tensor]  # (tokens (B,), positions (B,), sampling) -> next tokens (B,)


def _next(logits: Tensor, sampling: RowSampling | None, counter: Tensor) -> Tensor:
    """Logits (B, V) -> tokens (B,): argmax without sampling; `counter` (B,) is the new token's position."""
    return logits.argmax(-1) if sampling is None else choose(logits, *sampling, counter)


@torch.no_grad()
def prefill(llm: Llama, cache: list[KVCache], embeds: list[Tensor], rows: Tensor | None = None, sampling: RowSampling | None = None) -> Tensor:
    """Fill rows `rows` (B,) (default 0..B-1) of `cache` with prompts (T_b, dim) -> first tokens (B,)
    (greedy without `sampling`).

    This is where a batch forms, so this is where the prompts are right-padded: causal attention
    never lets a real token see a pad, and decoding overwrites the pad slots before they are visible."""
    lengths = torch.tensor([e.shape[0] for e in embeds], device=embeds[0].device)  # (B,)
    B, T = len(embeds), int(lengths.max())
    x = embeds[0].new_zeros(B, T, embeds[0].shape[-1])  # (B, T, dim)
    for b, e in enumerate(embeds):
        x[b, : e.shape[0]] = e
    pos = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
    h = llm(x, pos, "prefill", cache, rows)  # (B, T, dim)
    last = h[torch.arange(B, device=h.device), lengths - 1]  # (B, dim)
    return _next(llm.lm_head(last), sampling, lengths)


@torch.no_grad()
def decode_step(llm: Llama, cache: list[KVCache], tokens: Tensor, pos: Tensor, sampling: RowSampling | None = None) -> Tensor:
    """Tokens (B,) at positions (B,), one per row of `cache` -> next tokens (B,) (greedy without `sampling`)."""
    h = llm(llm.embed_tokens(tokens)[:, None], pos[:, None], "decode", cache)  # (B, 1, dim)
    return _next(llm.lm_head(h[:, 0]), sampling, pos + 1)


def _row_sampling(batch: int, device: torch.device) -> RowSampling:
    """Every row greedy."""
    return RowSampling(torch.zeros(batch, device=device), torch.ones(batch, device=device), torch.zeros(batch, dtype=torch.long, device=device))


class CUDAGraphStep:
    """A decode step recorded once as a CUDA graph, then replayed: one launch instead of a dozen
    kernels per layer, which at batch 1 is most of a step's time. The graph owns its input and
    output tensors (same addresses at every replay), and it reads and writes the cache tensors that
    `step` used when it was recorded: the generator's own cache, made once and never replaced."""

    def __init__(self, step: Step, batch: int, device: torch.device):
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # slot 0: harmless before any prefill
        self.sampling = _row_sampling(batch, device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up outside the graph: cuBLAS handles, compilation
            for _ in range(3):
                step(self.tokens, self.pos, self.sampling)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(self.tokens, self.pos, self.sampling)

    def __call__(self, tokens: Tensor, pos: Tensor, sampling: RowSampling) -> Tensor:
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        for mine, given in zip(self.sampling, sampling):
            mine.copy_(given)
        self.graph.replay()
        return self.out.clone()


class BatchGenerator:
    """Decoding of a stream of prompts with `batch_size` cache rows of `max_len` slots.

    cuda_graph records the decode step as a CUDA graph (CUDA only); compile runs it through
    torch.compile first. Both give the same tokens as eager decoding; they only remove overhead.
    sample: honour each prompt's Sampling (otherwise only greedy prompts are accepted).
    """

    def __init__(self, llm: Llama, batch_size: int, max_len: int, eos_id: int, cuda_graph: bool = False, compile: bool = False,
                 sample: bool = False):
        self.llm, self.batch_size, self.max_len, self.eos_id, self.sample = llm, batch_size, max_len, eos_id, sample
        self.device = llm.device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        self.cache = cache = llm.new_cache(batch_size, max_len)  # this generator's alone: passed into every call

        def step(tokens: Tensor, pos: Tensor, sampling: RowSampling) -> Tensor:
            return decode_step(llm, cache, tokens, pos, sampling if sample else None)

        if compile:
            step = torch.compile(step, dynamic=False)
        self.step_fn = CUDAGraphStep(step, batch_size, self.device) if cuda_graph else step
        # Each row's last token, its position and its sampling live on the device; the rest on the host.
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.sampling = _row_sampling(batch_size, self.device)
        self.keys: list[Hashable | None] = [None] * batch_size  # None: the row is free
        self.made = [0] * batch_size  # tokens generated so far
        self.limits = [0] * batch_size  # max_new_tokens

    def free_rows(self) -> int:
        return self.keys.count(None)

    def active(self) -> int:
        return self.batch_size - self.free_rows()

    @torch.no_grad()
    def add(self, prompts: list[Prompt]) -> list[Token]:
        """Prefill prompts (at most free_rows() of them) into free rows as one batch -> their first tokens."""
        free = [r for r in range(self.batch_size) if self.keys[r] is None]
        if len(prompts) > len(free):
            raise ValueError(f"{len(prompts)} prompts for {len(free)} free rows")
        for p in prompts:
            if p.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be at least 1, got {p.max_new_tokens}")
            if p.embeds.shape[0] + p.max_new_tokens - 1 > self.max_len:
                raise ValueError(f"a prompt of {p.embeds.shape[0]} tokens + {p.max_new_tokens} new tokens "
                                 f"does not fit the cache of {self.max_len} slots")
            if p.sampling.temperature > 0 and not self.sample:
                raise ValueError("a sampled prompt for a greedy generator (build it with sample=True)")
        rows = free[: len(prompts)]
        rows_t = torch.tensor(rows, device=self.device)
        self.sampling.temperature[rows_t] = torch.tensor([p.sampling.temperature for p in prompts], device=self.device)
        self.sampling.top_p[rows_t] = torch.tensor([p.sampling.top_p for p in prompts], device=self.device)
        self.sampling.seed[rows_t] = torch.tensor([p.sampling.seed for p in prompts], dtype=torch.long, device=self.device)
        sampling = RowSampling(*(field[rows_t] for field in self.sampling)) if self.sample else None
        first = prefill(self.llm, self.cache, [p.embeds for p in prompts], rows_t, sampling)
        self.tokens[rows_t] = first
        self.pos[rows_t] = torch.tensor([p.embeds.shape[0] for p in prompts], device=self.device)
        for r, p in zip(rows, prompts):
            self.keys[r], self.made[r], self.limits[r] = p.key, 0, p.max_new_tokens
        return [self._emit(r, t) for r, t in zip(rows, first.tolist())]

    @torch.no_grad()
    def step(self) -> list[Token]:
        """One decode step over the whole batch -> the next token of every busy row."""
        busy = [k is not None for k in self.keys]
        if not all(busy):  # park idle rows at slot 0
            self.pos = torch.where(torch.tensor(busy, device=self.device), self.pos, 0)
        self.tokens = self.step_fn(self.tokens, self.pos, self.sampling)
        self.pos = self.pos + 1
        return [self._emit(r, t) for r, t in enumerate(self.tokens.tolist()) if busy[r]]

    def cancel(self, key: Hashable) -> None:
        """Free the row generating `key` (nothing happens if none is)."""
        if key in self.keys:
            self.keys[self.keys.index(key)] = None

    def _emit(self, r: int, token: int) -> Token:
        """Row r made `token`: count it, and free the row if it ends the prompt's report."""
        key = self.keys[r]
        self.made[r] += 1
        finish = "stop" if token == self.eos_id else "length" if self.made[r] >= self.limits[r] else None
        if finish is not None:
            self.keys[r] = None
        return Token(key, token, finish)

    def run(self, prompts: Iterable[tuple[Hashable, Tensor]], max_new_tokens: int) -> Iterator[tuple[Hashable, list[int]]]:
        """Greedy: (key, prompt embeddings (T, dim)) pairs -> (key, new tokens without the EOS), in
        the order the rows finish. Prompts are taken from the iterable only when a row is free."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        outs: dict[Hashable, list[int]] = {}
        waiting, exhausted = iter(prompts), False
        while True:
            free = self.free_rows()
            group = [] if exhausted else list(islice(waiting, free))
            exhausted = exhausted or len(group) < free
            made = self.add([Prompt(key, e, max_new_tokens) for key, e in group]) if group else []
            if self.active():
                made += self.step()
            elif exhausted and not made:
                return
            for t in made:
                out = outs.setdefault(t.key, [])
                if t.finish != "stop":
                    out.append(t.id)
                if t.finish is not None:
                    yield t.key, outs.pop(t.key)


@torch.no_grad()
def greedy_generate(llm: Llama, embeds: list[Tensor], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding of prompts (T_b, dim), all in one batch, until every row has produced EOS or
    max_new_tokens tokens. Returns each row's new tokens, EOS excluded."""
    T = max(e.shape[0] for e in embeds)
    gen = BatchGenerator(llm, len(embeds), T + max_new_tokens, eos_id)
    done = dict(gen.run(enumerate(embeds), max_new_tokens))
    return [done[b] for b in range(len(embeds))]
