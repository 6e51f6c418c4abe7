"""Per-sentence heatmaps: the teacher-forced log-probabilities equal transformers', the relevance is
the derivative it claims to be, it passes the deletion test, and the overlay lands where the image
is bright, in the original image's coordinates."""

import copy

import numpy as np
import pytest
import torch
from _bench_fixtures import load_bench
from _explain_fixtures import FINDINGS, blob_image, tiny_model, tiny_tokenizer
from _infer_fixtures import shared_tiny_release
from PIL import Image
from transformers import LlamaTokenizer

from llavarad.explain.overlay import crop_box, drawn_size, grid_to_image, layer, render
from llavarad.explain.relevance import TeacherForcing, explain, gradient_relevance
from llavarad.infer.images import preprocess
from llavarad.model.llama import Llama
from llavarad.model.llava import LlavaRad, Projector
from llavarad.model.prompt import build_prompt, build_question
from llavarad.model.vision import VisionConfig, VisionTower

TEXT = "Heart size is normal, e.g. no cardiomegaly. Nodule of 1.5 cm at the left base. No pneumothorax."


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
explain_bench = load_bench("explain_bench")  # attention maps and the deletion test: bench-only code
attention_maps, deletion_drops = explain_bench.attention_maps, explain_bench.deletion_drops


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("sp"))


def test_sentence_logprobs_and_attention_equal_transformers(tmp_path_factory):
    """Each sentence's teacher-forced log-probability == the sum of transformers' (peft model)
    log-probabilities over that sentence's tokens, with the tokens found by Hugging Face's
    tokenizer on the text up to each sentence's end; the attention maps rollout is built from
    == transformers' eager attention probabilities, averaged over heads."""
    tiny = shared_tiny_release(tmp_path_factory)
    from llavarad.model.weights import load_llavarad

    model, tok = load_llavarad(str(tiny.release), str(tiny.base), torch.float32, "cpu")
    question = build_question("Cough.")
    tf = TeacherForcing(model, tok, question, TEXT)
    assert tf.sentences() == ["Heart size is normal, e.g. no cardiomegaly.", "Nodule of 1.5 cm at the left base.", "No pneumothorax."]
    feats = model.encode_images(preprocess(blob_image(0), model.tower.cfg.image_size)[None]).detach()

    hf_tok = LlamaTokenizer(vocab_file=str(tiny.base / "tokenizer.model"), legacy=True)
    prompt = build_prompt(question)
    n_image = feats.shape[1]

    def n_tokens(text: str) -> int:  # tokens in the spliced sequence: the image token becomes N slots
        return sum(len(hf_tok(c).input_ids) for c in text.split("<image>")) - 1 + n_image

    ends = [n_tokens(prompt)] + [n_tokens(prompt + " " + TEXT[:b]) for b in (43, 78, 95)]
    with torch.no_grad():
        embeds = model.embed([tf.ids], feats)[0][None]
        hf = copy.deepcopy(tiny.peft_model).merge_and_unload()(inputs_embeds=embeds, output_attentions=True)
        logp = hf.logits[0].log_softmax(-1)
        full = torch.tensor(tf.ids[tf.ids.index(-200) + 1 :])
        seq = torch.cat([torch.zeros(tf.ids.index(-200) + n_image, dtype=torch.long), full])  # ids by position
        expected = [logp[a - 1 : b - 1].gather(-1, seq[a:b, None]).sum() for a, b in zip(ends, ends[1:])]
        torch.testing.assert_close(tf.logprobs(feats), torch.stack(expected), rtol=1e-5, atol=1e-4)
    maps = attention_maps(tf, feats)
    assert len(maps) == len(hf.attentions) == 2
    for ours, theirs in zip(maps, hf.attentions):
        torch.testing.assert_close(ours, theirs[0].mean(0), rtol=1e-4, atol=1e-6)


def test_relevance_is_the_first_order_deletion_effect(tokenizer):
    """relevance_i == d/de of logp(x with patch i moved by e toward the mean patch) at e = 0, by
    central finite differences (float64 model; its RMSNorms still normalize in float32)."""
    model = tiny_model(grid=3, lm_head_scale=1.0).double()
    feats = model.encode_images(preprocess(blob_image(1, 42, 42), 42)[None].double()).detach()
    tf = TeacherForcing(model, tokenizer, build_question(None), FINDINGS[0])
    rel, lps = gradient_relevance(tf, feats)
    assert rel.shape == (2, 9) and torch.equal(lps, tf.logprobs(feats))
    delta = feats[0] - feats[0].mean(0)  # (N, dim)
    eps = 1e-2
    for i in range(9):
        up, down = feats.clone(), feats.clone()
        up[0, i] -= eps * delta[i]  # toward the mean: logp falls by relevance * eps
        down[0, i] += eps * delta[i]
        with torch.no_grad():
            fd = (tf.logprobs(down) - tf.logprobs(up)) / (2 * eps)
        torch.testing.assert_close(rel[:, i], fd, rtol=1e-3, atol=2e-4)


def test_deletion_top_patches_beat_random(tokenizer):
    """The faithfulness check, on tiny random models with fixed seeds: replacing the top 5% / 10% /
    20% of the 64 patches by relevance lowers a sentence's log-probability more than replacing
    random ones, on average over 2 images x 7 sentences. Measured (this fixture): drops of 2.72 /
    4.06 / 6.64 nats against 0.09 / -0.04 / -0.04 for random; `bench/explain_bench.py` gives more.

    The fixture is built so the test means something: random weights at unit scale and an LM
    head scaled x4, so the next-token distribution is peaked and moves with the image. The test
    asserts that first: removing every patch's content changes the sentences' log-probabilities."""
    model = tiny_model(grid=8, seed=0)
    g = torch.Generator().manual_seed(0)
    top, rand, whole = {f: [] for f in (0.05, 0.1, 0.2)}, {f: [] for f in (0.05, 0.1, 0.2)}, []
    for seed in (0, 1):
        feats = model.encode_images(preprocess(blob_image(seed), 112)[None]).detach()
        for text in FINDINGS:
            tf = TeacherForcing(model, tokenizer, build_question(None), text)
            rel, lps = gradient_relevance(tf, feats)
            whole += (lps - tf.logprobs(feats.mean(1, keepdim=True).expand_as(feats))).abs().tolist()
            for f in top:
                t, r = deletion_drops(tf, feats, rel, f, 4, g)
                top[f] += t.tolist()
                rand[f] += r.tolist()
    assert len(whole) == 14 and np.mean(whole) > 2  # the image matters (nats)
    for f in top:
        assert np.mean(top[f]) > np.mean(rand[f]) + 1, (f, np.mean(top[f]), np.mean(rand[f]))


def brightness_model(text_ids: list[int]) -> LlavaRad:
    """A model built so that gradient x input ranks patches by brightness.

    - tower (no blocks: select_layer -2 of depth 1): feature 0 = the patch's mean normalized pixel;
    - projector: dim 0 = GELU(feature + 2) (monotonic: its input is above 0), dim 1 = 10, so the
      decoder's RMSNorms keep dim 0 increasing in brightness;
    - decoder: layer 0 attends uniformly (q = k = 0) with v = o = identity, no MLP; layer 1 is
      the identity. The last position's dim 0 thus grows with every image patch's brightness;
    - LM head: every token of the text (`text_ids`) gets logit 5 * dim 0, every other token 0, so each sentence's
      log-probability grows with that dim. Every patch gets the same positive gradient on dim 0,
      and relevance = gradient x (feature - mean) is largest where the image is brightest.
    """
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig(image_size=518, width=8, depth=1, heads=1, mlp_hidden=8))
    from llavarad.model.config import LLAMA_PRESETS

    model = LlavaRad(tower, Projector(8, 64), Llama(LLAMA_PRESETS["tiny"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "llm.embed_tokens.weight":
                p.fill_(1.0 if "norm" in name else 0.0)
        tower.patch_embed.proj.weight[0] = 1 / (3 * 14 * 14)
        model.projector[0].weight[0, 0], model.projector[0].bias[0] = 1.0, 2.0
        model.projector[2].weight[0, 0], model.projector[2].bias[1] = 1.0, 10.0
        attn = model.llm.layers[0].attn
        attn.v_proj.weight.copy_(torch.eye(64))
        attn.o_proj.weight.copy_(torch.eye(64))
        model.llm.lm_head.weight[text_ids, 0] = 5.0
    return model


@pytest.mark.parametrize("w,h,square", [
    # Portrait 400 x 700: resized to 518 x 906, crop rows 194..712 -> original rows 150..550.
    (400, 700, (280, 180, 340, 240)),
    # Landscape 700 x 400: resized to 906 x 518, crop columns 194..712 -> original columns 150..550.
    (700, 400, (180, 260, 240, 320)),
    # Square: the crop is the whole image.
    (500, 500, (60, 330, 120, 390)),
])
def test_overlay_peak_is_on_the_bright_square(tokenizer, w, h, square):
    """A bright square (left, top, right, bottom) on a dark image: the map's peak, mapped back to the
    original pixels, falls inside the square; the overlays have the image's aspect."""
    pixels = np.full((h, w), 40, np.uint8)
    left, top, right, bottom = square
    pixels[top:bottom, left:right] = 255
    image = Image.fromarray(pixels).convert("RGB")
    expl = explain(brightness_model(tokenizer.encode_text(TEXT)), tokenizer, image, None, TEXT)
    assert [s.text for s in expl.sentences] == ["Heart size is normal, e.g. no cardiomegaly.",
                                                "Nodule of 1.5 cm at the left base.", "No pneumothorax."]
    for s in expl.sentences:
        assert s.relevance.shape == (37, 37)
        heat = grid_to_image(s.relevance, w, h, 518)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        assert left <= x < right and top <= y < bottom, (x, y)
        assert s.overlay.size[0] > w and s.overlay.size[1] > h  # the image, a colour scale, a caption


@pytest.mark.parametrize("w,h", [(400, 700), (1300, 900)])
def test_the_map_alone_laid_over_the_xray_is_the_overlay(w, h):
    """layer() (what the server's page draws over the picture) composited over the grey X-ray gives
    render()'s blended picture (but for the crop outline render draws): the same colours, place and size."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    grid = rng.normal(size=(37, 37)).astype(np.float32)
    scale, out_w, out_h = drawn_size(w, h)
    over = np.asarray(layer(grid, w, h, 518), np.float32)  # (out_h, out_w, 4)
    assert over.shape == (out_h, out_w, 4) and max(out_w, out_h) <= 1024
    base = np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR), np.float32)[..., None]
    alpha = over[..., 3:] / 255
    composite = base * (1 - alpha) + over[..., :3] * alpha
    drawn = np.asarray(render(image, grid, "caption", 518), np.float32)[:out_h, :out_w]
    outline = np.zeros((out_h, out_w), bool)
    left, top, right, bottom = (round(v * scale) for v in crop_box(w, h, 518))
    for x in (left, right - 1):
        outline[:, max(0, x - 1): x + 2] = True
    for y in (top, bottom - 1):
        outline[max(0, y - 1): y + 2] = True
    assert np.abs(composite - drawn)[~outline].max() <= 2  # uint8 rounding of the layer's colour and alpha
    assert alpha.max() > 0.5  # the map is there
