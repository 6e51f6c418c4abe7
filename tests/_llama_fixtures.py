"""Tiny random Hugging Face Llama models written in the real base-folder layout."""

from pathlib import Path

import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM


def tiny_hf_llama(vocab_size: int = 128, n_kv_heads: int = 2, seed: int = 0, max_positions: int = 512) -> LlamaForCausalLM:
    """A 2-layer Llama with every weight random (norms too), so a wrong key or layout shows."""
    torch.manual_seed(seed)
    cfg = HFLlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=max_positions,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def write_base(model: LlamaForCausalLM, folder: Path, safetensors: bool = True, shard: str | None = None) -> Path:
    """save_pretrained in the layout of lmsys/vicuna-7b-v1.5 (sharded when `shard` is a size like '20KB')."""
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=safetensors, **kw)
    return folder


def our_logits(llm, ids: torch.Tensor) -> torch.Tensor:
    """Our decoder's uncached forward of token ids (B, T) -> logits (B, T, vocab)."""
    B, T = ids.shape
    with torch.no_grad():
        return llm.lm_head(llm(llm.embed_tokens(ids), torch.arange(T).expand(B, T)))
