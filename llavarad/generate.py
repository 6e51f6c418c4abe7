"""KV-cached greedy decoding: prefill() the right-padded prompts, then decode_step() one token at a time.

Rows of different prompt lengths share one cache: row b's prompt fills slots 0..len_b-1, and its
t-th new token goes to slot len_b + t (see llama.py), so no row ever attends to another row's
padding and a prompt's output does not depend on what it is batched with.
"""

import torch
from torch import Tensor

from llavarad.llama import Llama


@torch.no_grad()
def prefill(llm: Llama, embeds: Tensor, lengths: Tensor) -> Tensor:
    """Fill the cache with prompts (B, T, dim) of true lengths (B,) -> first greedy tokens (B,)."""
    B, T, _ = embeds.shape
    pos = torch.arange(T, device=embeds.device).expand(B, T)  # (B, T)
    h = llm(embeds, pos, use_cache=True)  # (B, T, dim)
    last = h[torch.arange(B, device=h.device), lengths - 1]  # (B, dim)
    return llm.lm_head(last).argmax(-1)


@torch.no_grad()
def decode_step(llm: Llama, tokens: Tensor, pos: Tensor) -> Tensor:
    """Tokens (B,) at positions (B,) -> next greedy tokens (B,)."""
    h = llm(llm.embed_tokens(tokens)[:, None], pos[:, None], use_cache=True)  # (B, 1, dim)
    return llm.lm_head(h[:, 0]).argmax(-1)


@torch.no_grad()
def greedy_generate(llm: Llama, embeds: Tensor, lengths: Tensor, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding until every row has produced EOS or max_new_tokens tokens.

    Returns each row's new tokens, EOS excluded.
    """
    B, T, _ = embeds.shape
    llm.setup_cache(B, T + max_new_tokens)
    tok = prefill(llm, embeds, lengths)
    pos = lengths.clone()
    out = [tok]
    done = tok == eos_id
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        tok = decode_step(llm, tok, pos)
        tok = torch.where(done, eos_id, tok)  # finished rows keep emitting EOS
        out.append(tok)
        done |= tok == eos_id
        pos = pos + 1
    steps = torch.stack(out, dim=1).tolist()  # (B, n)
    return [row[: row.index(eos_id)] if eos_id in row else row for row in steps]
