"""Continuous batching: the tokens of every prompt equal transformers' greedy `generate` on that
prompt alone, whatever the batch size, prompt lengths and the order rows finish and are refilled."""

from collections import Counter

import pytest
import torch
from _llama_fixtures import tiny_hf_llama, write_base

from llavarad.infer.generate import BatchGenerator, decode_step, prefill
from llavarad.model.weights import load_llm

LENGTHS = [9, 3, 14, 6, 11, 4, 8]
NEW = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = tiny_hf_llama()
    llm = load_llm(write_base(hf, tmp_path_factory.mktemp("base")), torch.float32, "cpu")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in LENGTHS]
    with torch.no_grad():
        free = [hf.generate(p[None], max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]
    return llm, prompts, free, hf


def common_token(free: list[list[int]]) -> int:
    """A token that ends several of the free-running outputs at different steps."""
    return Counter(t for out in free for t in set(out[1:8])).most_common(1)[0][0]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_refilled_batches_match_transformers(models, batch_size):
    llm, prompts, free, _ = models
    eos = common_token(free)
    expected = {i: out[: out.index(eos)] if eos in out else out for i, out in enumerate(free)}
    assert len({len(e) for e in expected.values()}) > 2  # rows really finish at different steps
    gen = BatchGenerator(llm, batch_size, max(LENGTHS) + NEW, eos)
    with torch.no_grad():
        got = list(gen.run(((i, llm.embed_tokens(p)) for i, p in enumerate(prompts)), NEW))
    assert dict(got) == expected
    assert sorted(k for k, _ in got) == list(range(len(prompts)))  # each prompt exactly once


def test_generator_is_reusable_and_bounded(models):
    llm, prompts, free, _ = models
    gen = BatchGenerator(llm, 2, max(LENGTHS) + 4, eos_id=-1)
    with torch.no_grad():
        for _ in range(2):  # a second run reuses the same cache rows
            got = dict(gen.run(((i, llm.embed_tokens(p)) for i, p in enumerate(prompts[:3])), 4))
            assert got == {i: free[i][:4] for i in range(3)}
        with pytest.raises(ValueError, match="does not fit the cache"):
            list(gen.run([(0, llm.embed_tokens(prompts[2]))], 6))


def test_rows_ending_at_prefill(models):
    llm, prompts, free, _ = models
    eos = free[0][0]  # prompt 0 ends at once: its row is refilled before any decode step
    expected = {i: out[: out.index(eos)] if eos in out else out for i, out in enumerate(free)}
    with torch.no_grad():
        got = dict(BatchGenerator(llm, 2, max(LENGTHS) + NEW, eos).run(((i, llm.embed_tokens(p)) for i, p in enumerate(prompts)), NEW))
        one = dict(BatchGenerator(llm, 3, max(LENGTHS) + 1, -1).run(((i, llm.embed_tokens(p)) for i, p in enumerate(prompts)), 1))
    assert got == expected and got[0] == []
    assert one == {i: out[:1] for i, out in enumerate(free)}


def test_prefill_into_chosen_rows(models):
    """Prompts prefilled into rows 2 and then 1 of a live cache (one of them a 1-token prompt),
    then decoded together with row 0 idle."""
    llm, prompts, free, hf = models
    one = prompts[3][:1]
    with torch.no_grad():
        ref_one = hf.generate(one[None], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 1:].tolist()
        cache = llm.new_cache(3, 32)
        first2 = prefill(llm, cache, [llm.embed_tokens(prompts[1])], rows=torch.tensor([2]))
        first1 = prefill(llm, cache, [llm.embed_tokens(one)], rows=torch.tensor([1]))
        tok = torch.tensor([0, int(first1), int(first2)])
        pos = torch.tensor([0, 1, len(prompts[1])])
        out = [tok.tolist()]
        for _ in range(3):
            tok = decode_step(llm, cache, tok, pos)
            out.append(tok.tolist())
            pos = pos + torch.tensor([0, 1, 1])
    assert [row[1] for row in out] == ref_one and [row[2] for row in out] == free[1][:4]


def test_decode_step_compiles_without_graph_breaks(models):
    llm, prompts, free, _ = models
    with torch.no_grad():
        cache = llm.new_cache(2, 32)
        tok = prefill(llm, cache, [llm.embed_tokens(prompts[0]), llm.embed_tokens(prompts[1])])
        pos = torch.tensor([9, 3])
        compiled = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False)
        out = [tok.tolist()]
        for _ in range(3):
            tok = compiled(llm, cache, tok, pos)
            out.append(tok.tolist())
            pos = pos + 1
    assert [row[0] for row in out] == free[0][:4] and [row[1] for row in out] == free[1][:4]


def test_generators_over_one_model_do_not_interfere(models):
    """Two generators over one decoder, their steps interleaved: each owns its cache, so each gives
    transformers' tokens, as it would alone."""
    llm, prompts, free, _ = models
    eos = common_token(free)
    expected = {i: out[: out.index(eos)] if eos in out else out for i, out in enumerate(free)}
    parts = ([5, 6, 0], [3, 4, 1, 2])  # 5 and 6 end at different steps: the first generator pauses with a row in flight
    assert len(expected[5]) != len(expected[6])
    runs = [BatchGenerator(llm, 2, max(LENGTHS) + NEW, eos).run(((i, llm.embed_tokens(prompts[i])) for i in part), NEW)
            for part in parts]
    got = {}
    with torch.no_grad():
        while runs:
            for run in list(runs):
                try:
                    key, tokens = next(run)
                    got[key] = tokens
                except StopIteration:
                    runs.remove(run)
    assert got == expected


def test_cuda_graph_needs_cuda(models):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        BatchGenerator(models[0], 1, 16, eos_id=2, cuda_graph=True)
