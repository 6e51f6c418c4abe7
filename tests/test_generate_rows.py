"""BatchGenerator's per-row driving (add / step / cancel) and per-row sampling: greedy rows keep
transformers' greedy tokens when sampled rows share their batch; a seeded row makes the same tokens
whatever it is batched with and whenever it arrives; a cancelled row is reused cleanly; each row
stops at its own max_new_tokens; and on the tiny LLaVA-Rad the first sampled token follows
softmax(logits / T) restricted to the nucleus, the logits coming from transformers + peft."""

import numpy as np
import pytest
import torch
from _infer_fixtures import shared_tiny_release, write_images
from scipy import stats
from test_engine_batching import LENGTHS, NEW, models  # noqa: F401  (models: prompts and transformers' greedy tokens)

from llavarad.infer.generate import BatchGenerator, Prompt, RowSampling, Sampling, decode_step, prefill
from llavarad.infer.images import load_image, preprocess
from llavarad.model.prompt import build_prompt, build_question
from llavarad.model.weights import load_llavarad


def tokens_by_key(made: list) -> dict:
    out: dict = {}
    for t in made:
        out.setdefault(t.key, []).append(t.id)
    return out


def drive(gen: BatchGenerator, schedule: list[list[Prompt]]) -> dict:
    """schedule[i] arrives before decode step i and waits for free rows, as in the server's loop;
    steps until every prompt is done -> each key's tokens."""
    made, waiting, i = [], [], 0
    while i < len(schedule) or waiting or gen.active():
        waiting += schedule[i] if i < len(schedule) else []
        group, waiting = waiting[: gen.free_rows()], waiting[gen.free_rows():]
        if group:
            made += gen.add(group)
        if gen.active():
            made += gen.step()
        i += 1
    return tokens_by_key(made)


def test_greedy_rows_keep_transformers_tokens_beside_sampled_rows(models):
    llm, prompts, greedy, _ = models
    gen = BatchGenerator(llm, 4, max(LENGTHS) + NEW, -1, sample=True)
    embed = llm.embed_tokens
    sampled = [Prompt(f"s{i}", embed(prompts[i]), NEW, Sampling(1.2, 0.9, seed=i)) for i in range(2)]
    plain = [Prompt(i, embed(p), NEW) for i, p in enumerate(prompts)]
    with torch.no_grad():
        got = drive(gen, [[plain[0], sampled[0]], [plain[1], sampled[1]], [], [plain[2]], [plain[3]], [], [], [plain[4], plain[5]], [plain[6]]])
    assert {i: got[i] for i in range(len(prompts))} == dict(enumerate(greedy))
    assert got["s0"] != greedy[0]  # the sampled rows did sample


def test_a_seeded_row_does_not_depend_on_its_batch_or_arrival(models):
    llm, prompts, _, _ = models
    embed = llm.embed_tokens
    me = Prompt("me", embed(prompts[2]), NEW, Sampling(0.9, 0.95, seed=2024))
    with torch.no_grad():
        alone = drive(BatchGenerator(llm, 1, max(LENGTHS) + NEW, -1, sample=True), [[me]])["me"]
        others = [Prompt(i, embed(p), NEW, Sampling(1.0 if i % 2 else 0.0, 1.0, seed=i)) for i, p in enumerate(prompts)]
        crowded = drive(BatchGenerator(llm, 3, max(LENGTHS) + NEW, -1, sample=True), [[others[0], others[1]], [], [], [], [me], [others[3]], [], [], [others[4]]])
        late = drive(BatchGenerator(llm, 5, max(LENGTHS) + NEW, -1, sample=True), [[others[0], others[1], others[3], others[4]], [], [], [me]])
    assert alone == crowded["me"] == late["me"]
    again = drive(BatchGenerator(llm, 1, max(LENGTHS) + NEW, -1, sample=True), [[me._replace(sampling=Sampling(0.9, 0.95, seed=2025))]])["me"]
    assert again != alone  # the seed matters


def test_cancel_frees_the_row_for_the_next_prompt(models):
    llm, prompts, greedy, _ = models
    embed = llm.embed_tokens
    gen = BatchGenerator(llm, 2, max(LENGTHS) + NEW, -1, sample=True)
    with torch.no_grad():
        made = gen.add([Prompt("gone", embed(prompts[2]), NEW), Prompt(0, embed(prompts[0]), NEW)])
        for _ in range(3):
            made += gen.step()
        gen.cancel("gone")
        assert gen.free_rows() == 1
        gen.cancel("gone")  # twice, or for a key no row has: nothing happens
        made += gen.add([Prompt(1, embed(prompts[1]), NEW)])  # into the freed row
        while gen.active():
            made += gen.step()
    out = tokens_by_key(made)
    assert out["gone"] == greedy[2][:4]  # nothing after the cancel
    assert out[1] == greedy[1]  # the reused row's stale keys and values do not leak in
    assert out[0] == greedy[0]  # the other row carried on undisturbed


def test_each_row_stops_at_its_own_max_new_tokens(models):
    llm, prompts, greedy, _ = models
    gen = BatchGenerator(llm, 3, max(LENGTHS) + NEW, -1)  # greedy only: infer.py's generator
    with torch.no_grad():
        with pytest.raises(ValueError, match="sample=True"):
            gen.add([Prompt("x", llm.embed_tokens(prompts[0]), NEW, Sampling(temperature=0.5))])
        made = gen.add([Prompt(i, llm.embed_tokens(prompts[i]), n) for i, n in enumerate([1, 4, NEW])])
        while gen.active():
            made += gen.step()
    for i, n in enumerate([1, 4, NEW]):
        mine = [t for t in made if t.key == i]
        assert [t.id for t in mine] == greedy[i][:n]
        assert [t.finish for t in mine] == [None] * (n - 1) + ["length"]


def test_sampled_decode_step_compiles_without_graph_breaks(models):
    llm, prompts, _, _ = models
    cache = llm.new_cache(2, 32)
    rows = RowSampling(torch.tensor([0.0, 0.8]), torch.tensor([1.0, 0.9]), torch.tensor([1, 2]))
    with torch.no_grad():
        tok = prefill(llm, cache, [llm.embed_tokens(prompts[0]), llm.embed_tokens(prompts[1])], sampling=rows)
        pos = torch.tensor([LENGTHS[0], LENGTHS[1]])
        eager = decode_step(llm, cache, tok, pos, rows)
        compiled = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False)
        assert torch.equal(compiled(llm, cache, tok, pos, rows), eager)


def test_first_sampled_token_follows_the_nucleus_of_transformers_logits(tmp_path_factory):
    """1,000 rows, one prompt, seeds 0..999: the counts of the first token against softmax(logits / T)
    restricted to the top-p nucleus, with the logits of the reference decoder (transformers + peft, fed
    our spliced embeddings) and the nucleus computed here in numpy."""
    tiny = shared_tiny_release(tmp_path_factory)
    model, tokenizer = load_llavarad(str(tiny.release), str(tiny.base), torch.float32, "cpu")
    folder = tmp_path_factory.mktemp("dist")
    image = load_image(str(folder / write_images(folder, 1, seed=4)[0]))
    ids = tokenizer.encode_prompt(build_prompt(build_question("Cough.")))
    temperature, top_p, n = 0.2, 0.8, 1000  # the tiny model's logits are flat: a low temperature gives a nucleus of 10
    with torch.no_grad():
        embeds = model.embed([ids], model.encode_images(preprocess(image, 28)[None]))[0]  # (T, dim)
        logits = tiny.peft_model(inputs_embeds=embeds[None]).logits[0, -1].double().numpy()
        gen = BatchGenerator(model.llm, n, embeds.shape[0] + 1, tokenizer.eos_id, sample=True)
        made = gen.add([Prompt(s, embeds, 1, Sampling(temperature, top_p, seed=s)) for s in range(n)])
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    nucleus = order[before < top_p]
    expected = np.zeros_like(p)
    expected[nucleus] = p[nucleus] / p[nucleus].sum()
    counts = np.bincount([t.id for t in made], minlength=len(p))
    assert counts[expected == 0].sum() == 0, "a token outside the nucleus"
    assert 4 <= len(nucleus) <= 30, len(nucleus)  # a real spread that 1,000 draws can test
    big = expected * n >= 5  # chi-square needs expected counts of 5 or more: pool the rest
    f_obs = np.append(counts[big], counts[~big].sum())
    f_exp = np.append(expected[big], expected[~big].sum()) * n
    keep = f_exp > 0
    assert stats.chisquare(f_obs[keep], f_exp[keep]).pvalue > 1e-3
