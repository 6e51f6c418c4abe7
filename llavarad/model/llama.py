"""The Llama-2 decoder (Vicuna-7B v1.5), read top to bottom, with a preallocated KV cache.

The model works on input embeddings, not token ids, because LLaVA splices image features into
the embedding sequence. Three ways to call it, named by `mode`:
  - "causal" (training, uncached): causal attention over the batch, no cache;
  - "prefill": positions 0..T-1 for every row, keys/values written into the cache the caller
    passes; rows of different lengths are right-padded, so causal attention never lets a real
    token see a pad;
  - "decode": one token per row at a per-row position. Each row writes its key/value at its own
    slot and attends to slots <= its position, which also hides the pad slots that the prefill
    wrote past a short row's end (they are overwritten before they become visible).
The cache belongs to the caller (generate.BatchGenerator) and is passed into every call, so two
generators over one model never share state.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llavarad.model.config import LlamaConfig

try:  # optional: used for CUDA tensors when installed
    from flash_attn import flash_attn_func, flash_attn_with_kvcache
except ImportError:
    flash_attn_func = flash_attn_with_kvcache = None

Mode = Literal["causal", "prefill", "decode"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, cast back, then scale: the order Hugging Face uses, so bf16 agrees.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for positions `pos` (B, T) in the rotate-half layout: (B, T, head_dim) each."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    freqs = pos.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, H, hd); Hugging Face stores q/k weights for this rotate-half pairing."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class KVCache:
    """One layer's static cache in flash-attn's layout (B, S, H_kv, hd), made by `Llama.new_cache`."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, pos: Tensor, k: Tensor, v: Tensor, rows: Tensor | None = None) -> None:
        """Store k, v (B, T, H_kv, hd) at slots pos (B, T) of cache rows `rows` (B,) (default 0..B-1)."""
        if rows is None:
            rows = torch.arange(k.shape[0], device=k.device)
        rows = rows[:, None].expand_as(pos)  # (B, T)
        self.k[rows, pos] = k
        self.v[rows, pos] = v


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, mode: Mode, cache: KVCache | None, rows: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, H, hd)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if mode != "causal":
            cache.write(pos, k, v, rows)
        if mode == "decode":  # attend to this row's cache slots 0..pos
            y = self._decode_attention(q, pos, cache, rows)
        else:  # causal, or prefill from position 0: causal over the fresh keys
            y = self._causal_attention(q, k, v)
        return self.o_proj(y.reshape(B, T, -1))

    def _causal_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if flash_attn_func is not None and q.is_cuda:
            return flash_attn_func(q, k, v, causal=True)  # (B, T, H, hd)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v), is_causal=True)
        return y.transpose(1, 2)  # (B, T, H, hd)

    def _decode_attention(self, q: Tensor, pos: Tensor, cache: KVCache, rows: Tensor | None) -> Tensor:
        if flash_attn_with_kvcache is not None and q.is_cuda:
            seqlens = (pos[:, 0] + 1).to(torch.int32)  # keys 0..pos are valid for each row
            idx = None if rows is None else rows.to(torch.int32)
            return flash_attn_with_kvcache(q, cache.k, cache.v, cache_seqlens=seqlens, cache_batch_idx=idx)
        ck, cv = (cache.k, cache.v) if rows is None else (cache.k[rows], cache.v[rows])  # (B, S, Hkv, hd)
        k = self._repeat_kv(ck.transpose(1, 2))  # (B, H, S, hd)
        v = self._repeat_kv(cv.transpose(1, 2))
        slots = torch.arange(k.shape[2], device=q.device)
        mask = (slots[None, :] <= pos)[:, None, None, :]  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)  # (B, H, 1, hd)
        return y.transpose(1, 2)

    def _repeat_kv(self, t: Tensor) -> Tensor:
        """(B, Hkv, S, hd) -> (B, H, S, hd) for grouped-query attention."""
        n_rep = self.n_heads // self.n_kv_heads
        return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=1)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, mode: Mode, cache: KVCache | None, rows: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, pos, mode, cache, rows)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """A preallocated cache, one KVCache per layer, for `batch` rows of `max_len` slots; the
        caller keeps it and passes it to every "prefill" and "decode" call."""
        cfg, w = self.cfg, self.lm_head.weight
        return [KVCache(batch, max_len, cfg.n_kv_heads, cfg.head_dim, w.dtype, w.device) for _ in self.layers]

    def forward(self, h: Tensor, pos: Tensor, mode: Mode = "causal", cache: list[KVCache] | None = None,
                rows: Tensor | None = None) -> Tensor:
        """Input embeddings h (B, T, dim) at positions pos (B, T) -> final normed hidden states (B, T, dim).
        "prefill" and "decode" need a cache (from `new_cache`); `rows` (B,) are the cache rows the
        sequences live in (default 0..B-1).

        Logits are left to the caller (`self.lm_head`), which usually needs only a few positions.
        """
        if (cache is None) != (mode == "causal"):
            raise ValueError(f"mode {mode!r} {'needs' if cache is None else 'takes no'} cache")
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, pos, mode, None if cache is None else cache[i], rows)
        return self.norm(h)
