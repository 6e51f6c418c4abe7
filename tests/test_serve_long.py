"""The server at LLaVA-Rad's real lengths (issue 18.15): a tiny release whose tower sees 518 px images as
the real one does (37 x 37 = 1,369 image slots), so every prompt takes at least 1,449 positions, and 64
new tokens. Three requests with prompts of different lengths are decoded together in one server's batch
and each answer must be transformers' greedy tokens for the same spliced embeddings. The other serving
tests use 4 image slots: a position counter that skips a slot past position 400, or a decode attention
that ignores the cache slots more than 300 back, passes them but not this one (both tried)."""

import copy
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from _infer_fixtures import write_images
from _release_fixtures import write_tiny_release
from _serve_fixtures import ServerProcess, chat_body, sse_text

from llavarad.infer.images import load_image, preprocess
from llavarad.infer.pipeline import embed_images, prompt_ids
from llavarad.model.prompt import build_question
from llavarad.model.weights import load_llavarad

N_IMAGE, NEW = 1369, 64
REASONS = [None, "Cough.", "Shortness of breath and fever for three days.\nEvaluate for pneumonia or effusion."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The release, one image per request, and transformers' greedy tokens for each request alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models are all per-op overhead (tests/conftest.py's one_thread)
    tiny = write_tiny_release(tmp_path_factory.mktemp("long_release"), image_size=518, max_positions=2048)
    folder = tmp_path_factory.mktemp("long_images")
    images = [folder / name for name in write_images(folder, len(REASONS), seed=2)]
    model, tokenizer = load_llavarad(str(tiny.release), str(tiny.base), torch.float32, "cpu")
    assert model.tower.num_patches == N_IMAGE
    hf = copy.deepcopy(tiny.peft_model).merge_and_unload()  # transformers' decoder, the adapter merged by peft
    refs = []
    with torch.no_grad():
        for image, reason in zip(images, REASONS):
            ids = prompt_ids(tokenizer, build_question(reason))
            # our splice (test_model_e2e holds it to the reference pipeline), transformers' decoding
            embeds = embed_images(model, preprocess(load_image(str(image)), 518)[None], [ids])[0]  # (T, dim)
            out = hf.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                              max_new_tokens=NEW, do_sample=False, eos_token_id=tokenizer.eos_id, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
            tokens = out.sequences[0].tolist()
            top2 = torch.stack(out.scores)[:, 0].topk(2).values  # (NEW, 2)
            assert len(tokens) == NEW and tokenizer.eos_id not in tokens  # 64 tokens, none of them the end
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # no near-tie: the comparison is not a coin toss
            refs.append(tokenizer.decode(tokens))
    torch.set_num_threads(threads)
    return tiny, images, refs


def test_rows_of_real_lengths_in_one_batch_give_transformers_greedy_tokens(setup):
    tiny, images, refs = setup
    server = ServerProcess(tiny.release, tiny.base, "--batch-size", str(len(REASONS)), "--max-new-tokens", str(NEW),
                           "--max-text-tokens", "256")

    def ask(k: int) -> tuple[str, dict]:
        body = chat_body(images[k], REASONS[k], max_tokens=NEW, stream=k == 1, stream_options={"include_usage": True})
        if k == 1:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as r:
                text, chunks, _ = sse_text(r)
            return text, chunks[-1]["usage"]
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]

    try:
        with ThreadPoolExecutor(len(REASONS)) as pool:
            answers = list(pool.map(ask, range(len(REASONS))))
    finally:
        assert server.stop() == 0
    prompts = [usage["prompt_tokens"] for _, usage in answers]
    assert min(prompts) >= 1449 and len(set(prompts)) == len(REASONS)  # real lengths, every row its own
    assert [usage["completion_tokens"] for _, usage in answers] == [NEW] * len(REASONS)
    assert [text for text, _ in answers] == refs
