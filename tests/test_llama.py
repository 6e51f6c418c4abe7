"""Our decoder against transformers' LlamaForCausalLM on tiny random weights in the real layout."""

import pytest
import torch
from _llama_fixtures import tiny_hf_llama, write_base

from llavarad.infer.generate import greedy_generate
from llavarad.model.weights import load_llm

LENGTHS = [5, 11, 17]


def load_ours(hf, tmp_path, **kw):
    return load_llm(write_base(hf, tmp_path / "base", **kw), torch.float32, "cpu")


def right_pad(prompts: list[torch.Tensor], llm) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = torch.zeros(len(prompts), max(len(p) for p in prompts), llm.cfg.dim)
    for b, p in enumerate(prompts):
        embeds[b, : len(p)] = llm.embed_tokens(p)
    return embeds, torch.tensor([len(p) for p in prompts])


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # multi-head and grouped-query
def test_logits_match_transformers(tmp_path, n_kv_heads):
    hf = tiny_hf_llama(n_kv_heads=n_kv_heads)
    llm = load_ours(hf, tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g) for n in LENGTHS]
    embeds, lengths = right_pad(prompts, llm)
    with torch.no_grad():
        ours = llm.lm_head(llm(embeds, torch.arange(embeds.shape[1]).expand(len(prompts), -1)))  # (B, T, V)
        for b, p in enumerate(prompts):
            ref = hf(p[None]).logits[0]
            torch.testing.assert_close(ours[b, : len(p)], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["safetensors", "bin-sharded"])
def test_checkpoint_layouts_load(tmp_path, layout):
    hf = tiny_hf_llama()
    kw = {"safetensors": False, "shard": "40KB"} if layout == "bin-sharded" else {}
    llm = load_ours(hf, tmp_path, **kw)
    if layout == "bin-sharded":
        assert len(list((tmp_path / "base").glob("pytorch_model-*.bin"))) > 1
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        ours = llm.lm_head(llm(llm.embed_tokens(ids), torch.arange(17)[None]))
        torch.testing.assert_close(ours, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_cached_equals_uncached(tmp_path):
    llm = load_ours(tiny_hf_llama(), tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=g) for n in LENGTHS]
    steps = 6
    continuations = [torch.randint(0, 128, (steps,), generator=g) for _ in prompts]
    with torch.no_grad():
        embeds, lengths = right_pad(prompts, llm)
        B, T, _ = embeds.shape
        cache = llm.new_cache(B, T + steps)
        h = llm(embeds, torch.arange(T).expand(B, T), "prefill", cache)
        cached = [[llm.lm_head(h[b, lengths[b] - 1])] for b in range(B)]
        for t in range(steps):
            toks = torch.stack([c[t] for c in continuations])
            pos = (lengths + t)[:, None]
            h = llm(llm.embed_tokens(toks)[:, None], pos, "decode", cache)
            for b in range(B):
                cached[b].append(llm.lm_head(h[b, 0]))
        for b in range(B):
            full = torch.cat([prompts[b], continuations[b]])
            ref = llm.lm_head(llm(llm.embed_tokens(full)[None], torch.arange(len(full))[None]))[0]
            torch.testing.assert_close(torch.stack(cached[b]), ref[len(prompts[b]) - 1 :], atol=1e-5, rtol=1e-5)


def test_greedy_matches_transformers_generate(tmp_path):
    hf = tiny_hf_llama()
    llm = load_ours(hf, tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in LENGTHS]
    with torch.no_grad():
        refs = [hf.generate(p[None], max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        for p, ref in zip(prompts, refs):  # one by one
            assert greedy_generate(llm, [llm.embed_tokens(p)], 20, eos_id=-1)[0] == ref
        embeds = [llm.embed_tokens(p) for p in prompts]  # batched, different lengths
        assert greedy_generate(llm, embeds, 20, eos_id=-1) == refs


def test_greedy_stops_at_eos(tmp_path):
    llm = load_ours(tiny_hf_llama(), tmp_path)
    p = torch.randint(3, 128, (7,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        free = greedy_generate(llm, [llm.embed_tokens(p)], 12, eos_id=-1)[0]
        eos = free[4]  # pretend the 5th generated token is EOS
        stopped = greedy_generate(llm, [llm.embed_tokens(p)], 12, eos_id=eos)[0]
    assert stopped == free[: free.index(eos)]
