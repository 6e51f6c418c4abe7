"""KV-cached greedy decoding: prefill() prompts (right-padded there, where the batch forms) into
cache rows, then decode_step() one token at a time, with continuous batching over a stream of prompts.

Rows of different prompt lengths share one cache: row b's prompt fills slots 0..len_b-1, and its
t-th new token goes to slot len_b + t (see llama.py), so no row ever attends to another row's
padding and a prompt's output does not depend on what it is batched with.

BatchGenerator keeps a fixed number of cache rows busy. When a row emits EOS (or reaches
max_new_tokens) its tokens are handed back and the next waiting prompt is prefilled into that row,
so a finished report stops costing compute and a batch never waits for its longest report. The
decode step always runs on the whole batch, so its shapes never change and it can be recorded
once as a CUDA graph (optionally after torch.compile). Each BatchGenerator makes its own cache and
passes it into every model call, so generators over one model never share state. Rows left idle once the stream runs dry
sit at position 0: with flash-attn they read one cache slot; their share of the weight reads,
which dominate a decode step, is free.
"""

from collections.abc import Callable, Hashable, Iterable, Iterator
from itertools import islice

import torch
from torch import Tensor

from llavarad.llama import KVCache, Llama

Step = Callable[[Tensor, Tensor], Tensor]  # (tokens (B,), positions (B,)) -> next tokens (B,)


@torch.no_grad()
def prefill(llm: Llama, cache: list[KVCache], embeds: list[Tensor], rows: Tensor | None = None) -> Tensor:
    """Fill rows `rows` (B,) (default 0..B-1) of `cache` with prompts (T_b, dim) -> first greedy tokens (B,).

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
    return llm.lm_head(last).argmax(-1)


@torch.no_grad()
def decode_step(llm: Llama, cache: list[KVCache], tokens: Tensor, pos: Tensor) -> Tensor:
    """Tokens (B,) at positions (B,), one per row of `cache` -> next greedy tokens (B,)."""
    h = llm(llm.embed_tokens(tokens)[:, None], pos[:, None], "decode", cache)  # (B, 1, dim)
    return llm.lm_head(h[:, 0]).argmax(-1)


class CUDAGraphStep:
    """A decode step recorded once as a CUDA graph, then replayed: one launch instead of a dozen
    kernels per layer, which at batch 1 is most of a step's time. The graph owns its input and
    output tensors (same addresses at every replay), and it reads and writes the cache tensors that
    `step` used when it was recorded: the generator's own cache, made once and never replaced."""

    def __init__(self, step: Step, batch: int, device: torch.device):
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # slot 0: harmless before any prefill
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up outside the graph: cuBLAS handles, compilation
            for _ in range(3):
                step(self.tokens, self.pos)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(self.tokens, self.pos)

    def __call__(self, tokens: Tensor, pos: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.out.clone()


class BatchGenerator:
    """Greedy decoding of a stream of prompts with `batch_size` cache rows of `max_len` slots.

    cuda_graph records the decode step as a CUDA graph (CUDA only); compile runs it through
    torch.compile first. Both give the same tokens as eager decoding; they only remove overhead.
    """

    def __init__(self, llm: Llama, batch_size: int, max_len: int, eos_id: int, cuda_graph: bool = False, compile: bool = False):
        self.llm, self.batch_size, self.max_len, self.eos_id = llm, batch_size, max_len, eos_id
        self.device = llm.lm_head.weight.device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        self.cache = llm.new_cache(batch_size, max_len)  # this generator's alone: passed into every call
        cache = self.cache

        def step(tokens: Tensor, pos: Tensor) -> Tensor:
            return decode_step(llm, cache, tokens, pos)

        if compile:
            step = torch.compile(step, dynamic=False)
        self.step = CUDAGraphStep(step, batch_size, self.device) if cuda_graph else step

    @torch.no_grad()
    def run(self, prompts: Iterable[tuple[Hashable, Tensor]], max_new_tokens: int) -> Iterator[tuple[Hashable, list[int]]]:
        """(key, prompt embeddings (T, dim)) pairs -> (key, new tokens without the EOS), in the
        order the rows finish. Prompts are taken from the iterable only when a row is free."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        B, device = self.batch_size, self.device
        tokens = torch.zeros(B, dtype=torch.long, device=device)
        pos = torch.zeros(B, dtype=torch.long, device=device)
        keys: list[Hashable | None] = [None] * B  # None: the row is free
        outs: list[list[int]] = [[] for _ in range(B)]
        waiting, exhausted = iter(prompts), False
        while True:
            free = [r for r in range(B) if keys[r] is None]
            group = [] if exhausted else list(islice(waiting, len(free)))
            exhausted = exhausted or len(group) < len(free)
            if group:
                rows = free[: len(group)]
                first, lengths = self._prefill([e for _, e in group], rows, max_new_tokens)
                rows_t = torch.tensor(rows, device=device)
                tokens[rows_t], pos[rows_t] = first, lengths
                for r, (key, _), t in zip(rows, group, first.tolist()):
                    keys[r], outs[r] = key, [t]
                for r in rows:  # a row whose first token already ends it
                    if self._finished(outs[r], max_new_tokens):
                        yield self._release(keys, outs, r)
            active = [keys[r] is not None for r in range(B)]
            if not any(active):
                if exhausted:
                    return
                continue
            if not all(active):  # park idle rows at slot 0
                pos = torch.where(torch.tensor(active, device=device), pos, 0)
            tokens = self.step(tokens, pos)
            pos = pos + 1
            for r, t in enumerate(tokens.tolist()):
                if keys[r] is not None:
                    outs[r].append(t)
                    if self._finished(outs[r], max_new_tokens):
                        yield self._release(keys, outs, r)

    def _prefill(self, embeds: list[Tensor], rows: list[int], max_new_tokens: int) -> tuple[Tensor, Tensor]:
        """Prefill prompts (T_i, dim) into cache rows `rows` -> first tokens (k,), lengths (k,)."""
        lengths = torch.tensor([e.shape[0] for e in embeds], device=self.device)
        T = int(lengths.max())
        if T + max_new_tokens - 1 > self.max_len:
            raise ValueError(f"a prompt of {T} tokens + {max_new_tokens} new tokens does not fit the cache of {self.max_len} slots")
        return prefill(self.llm, self.cache, embeds, torch.tensor(rows, device=self.device)), lengths

    def _finished(self, out: list[int], max_new_tokens: int) -> bool:
        return out[-1] == self.eos_id or len(out) >= max_new_tokens

    def _release(self, keys: list, outs: list[list[int]], r: int) -> tuple[Hashable, list[int]]:
        key, out = keys[r], outs[r]
        keys[r], outs[r] = None, []
        return key, out[:-1] if out[-1] == self.eos_id else out


@torch.no_grad()
def greedy_generate(llm: Llama, embeds: list[Tensor], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding of prompts (T_b, dim), all in one batch, until every row has produced EOS or
    max_new_tokens tokens. Returns each row's new tokens, EOS excluded."""
    T = max(e.shape[0] for e in embeds)
    gen = BatchGenerator(llm, len(embeds), T + max_new_tokens, eos_id)
    done = dict(gen.run(enumerate(embeds), max_new_tokens))
    return [done[b] for b in range(len(embeds))]
