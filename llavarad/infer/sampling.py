"""Next-token choice per row: greedy (temperature 0) or sampled with temperature and top-p, from noise
that depends only on the row's seed and the position of the token being chosen.

Sampling is the Gumbel-max trick: argmax(logits / T + g) with g = -log(-log(u)), u uniform, picks
token i with probability softmax(logits / T)_i. Top-p (nucleus) first drops every token outside the
smallest set of most likely tokens whose probability reaches top_p. The uniforms come from a
counter-based hash of (seed, position, token id) instead of a random generator's state, so a
request's text depends on its seed alone: not on the rows it is batched with, on the order rows
were filled, or on how many steps ran before it arrived. Everything is element-wise on (B, V)
tensors without host synchronisation, so it runs inside a recorded CUDA graph.
"""

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser (a bijection on 32-bit values) on int64 tensors holding values below
    2**32; the products may wrap past 2**63, which leaves their low 32 bits exact."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniforms(seed: Tensor, counter: Tensor, vocab: int) -> Tensor:
    """Seeds (B,) int64 and counters (B,) int64 -> uniforms (B, vocab) float32 in (0, 1), 24 bits each."""
    key = _mix32((seed & _M32) ^ _mix32(((seed >> 32) & _M32) ^ 0x9E3779B9))  # (B,) both halves of a 64-bit seed
    key = _mix32(key ^ _mix32((counter & _M32) ^ 0x7F4A7C15))  # (B,)
    ids = _mix32(torch.arange(vocab, device=seed.device, dtype=torch.int64))  # (V,)
    bits = _mix32(key[:, None] ^ ids)  # (B, V)
    return ((bits >> 8).float() + 0.5) / 2**24


def choose(logits: Tensor, temperature: Tensor, top_p: Tensor, seed: Tensor, counter: Tensor) -> Tensor:
    """Logits (B, V) -> token ids (B,). Per row: temperature (B,) (0 = argmax), top_p (B,) in (0, 1],
    seed (B,) and counter (B,) int64 (the position of the token being chosen)."""
    logits = logits.float()
    greedy = logits.argmax(-1)  # (B,)
    t = torch.where(temperature > 0, temperature, 1.0).float()[:, None]  # (B, 1); greedy rows ignore it
    scaled = logits / t  # (B, V)
    probs, order = scaled.softmax(-1).sort(-1, descending=True)  # (B, V) each
    before = probs.cumsum(-1) - probs  # (B, V) the mass of the more likely tokens
    keep_sorted = before < top_p.float()[:, None]  # the most likely token is always kept (before = 0)
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)  # (B, V) back in token order
    gumbel = -torch.log(-torch.log(uniforms(seed, counter, logits.shape[-1])))  # (B, V)
    sampled = torch.where(keep, scaled + gumbel, -torch.inf).argmax(-1)  # (B,)
    return torch.where(temperature > 0, sampled, greedy)
