"""Decoding at LLaVA-Rad's real lengths (issue 18.15). Every real prompt is the 1,369 image slots plus
its text, at least 1,449 positions, while the other decode tests use prompts of a few dozen: a
position counter that goes wrong past position 400, or a decode attention that drops the cache
slots far back, passes them. Here the tiny decoder writes 64 tokens after prompts of 1,449 to 1,474
positions, batched with rows of other lengths, and must give transformers' greedy tokens."""

import pytest
import torch
from _llama_fixtures import tiny_hf_llama, write_base

from llavarad.infer.generate import BatchGenerator, greedy_generate
from llavarad.model.weights import load_llm

N_IMAGE, NEW = 1369, 64
TEXT = [(35, 45), (35, 70), (35, 58)]  # text tokens before and after the image: 1,449, 1,474 and 1,462 positions

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def long_prompts(tmp_path_factory):
    """Our decoder, the prompts' embeddings (T, dim) and transformers' greedy tokens for each alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread, which a module fixture runs before
    hf = tiny_hf_llama(max_positions=2048)
    llm = load_llm(write_base(hf, tmp_path_factory.mktemp("base")), torch.float32, "cpu")
    g = torch.Generator().manual_seed(6)
    prompts, refs = [], []
    with torch.no_grad():
        for before, after in TEXT:
            ids = torch.randint(3, 128, (before + after,), generator=g)
            image = 0.1 * torch.randn(N_IMAGE, llm.cfg.dim, generator=g)  # the scale of the token embeddings
            prompts.append(torch.cat([llm.embed_tokens(ids[:before]), image, llm.embed_tokens(ids[before:])]))
            out = hf.generate(inputs_embeds=prompts[-1][None], max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            top2 = torch.stack(out.scores)[:, 0].topk(2).values  # (NEW, 2)
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # no near-tie: the comparison is not a coin toss
            assert len(set(out.sequences[0].tolist())) > 20  # a varied text, where a wrong step shows
            refs.append(out.sequences[0].tolist())
    torch.set_num_threads(threads)
    return llm, prompts, refs


def test_one_batch_of_real_lengths_gives_transformers_tokens(long_prompts):
    llm, prompts, refs = long_prompts
    assert min(len(p) for p in prompts) >= 1449 and len({len(p) for p in prompts}) == len(prompts)
    with torch.no_grad():
        assert greedy_generate(llm, prompts, NEW, eos_id=-1) == refs


def test_refilled_rows_of_real_lengths_give_transformers_tokens(long_prompts):
    """Two rows for three prompts: the third goes into a row that a longer prompt used before."""
    llm, prompts, refs = long_prompts
    gen = BatchGenerator(llm, 2, max(len(p) for p in prompts) + NEW, eos_id=-1)
    with torch.no_grad():
        assert dict(gen.run(enumerate(prompts), NEW)) == dict(enumerate(refs))
