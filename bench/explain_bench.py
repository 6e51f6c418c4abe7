"""Heatmaps on the CPU: the deletion test that chose the relevance method, and what `--explain` costs.

    python bench/explain_bench.py                          # about a minute of CPU
    python bench/explain_bench.py --seeds 1 --images 1     # seconds

Tiny random models (the demo's tiny decoder and tower, the tower at an 8 x 8 patch grid, weights at
unit output scale and the LM head scaled so that the image matters), the demo's synthetic X-rays,
tokenizer and first three findings texts. For each method (gradient x input, attention rollout) and
fraction of patches, the mean over models, images and sentences of the log-probability drop when the
method's top patches are replaced by the mean patch, against the mean drop for random patches (5
draws). Then the time of `explain` (teacher forcing, gradients, overlays) on one report at the real
grid (37 x 37 patches, a 518 px tower at tiny width) on one CPU thread, as CPU time.

The deletion test:The deletion test of a relevance map: does removing the patches it ranks highest hurt the
sentence more than removing random patches?

"Removing" a patch sets its projected feature to the image's mean patch feature (the baseline the
gradient x input maps are taken against). For a fraction f of the N patches, a sentence's drop is
its log-probability with the full image minus its log-probability with k = round(f * N) patches
removed: the k it ranks highest, or k random ones (the mean drop over `n_random` draws; the same
draws for every sentence). A faithful map has a larger drop for its top patches, at every f.

Attention rollout and the deletion test live here, not in the package: only this benchmark uses them.
"""

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from llavarad.demo import FINDINGS, TINY_TOWER, tokenizer_model, xray_like
from llavarad.explain.relevance import TeacherForcing, explain, gradient_relevance
from llavarad.infer.images import preprocess
from llavarad.model.config import LLAMA_PRESETS
from llavarad.model.llama import Llama, apply_rope
from llavarad.model.llava import LlavaRad, Projector
from llavarad.model.prompt import build_question
from llavarad.model.tokenizer import Tokenizer
from llavarad.model.vision import VisionTower

FRACTIONS = (0.05, 0.1, 0.2)
TEXTS = FINDINGS[:3]


@torch.no_grad()
def attention_maps(tf: TeacherForcing, feats: Tensor) -> list[Tensor]:
    """Each decoder layer's attention probabilities, averaged over heads, (T, T) per layer, for the
    teacher-forced sequence: recomputed from every attention module's input during the forward,
    since the fused attention kernels never form them."""
    probs = []

    def keep_attention(attn, args, _out):
        x, cos, sin = args[:3]  # the block's normed input and the RoPE tables
        B, T, _ = x.shape
        q = apply_rope(attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim), cos, sin).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rope(attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim), cos, sin).transpose(1, 2)
        scores = q.float() @ attn._repeat_kv(k).float().transpose(-1, -2) / attn.head_dim**0.5  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        probs.append(scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(1)[0])  # (T, T)

    hooks = [layer.attn.register_forward_hook(keep_attention) for layer in tf.model.llm.layers]
    try:
        tf.logprobs(feats)
    finally:
        for hook in hooks:
            hook.remove()
    return probs


def rollout_relevance(tf: TeacherForcing, feats: Tensor) -> Tensor:
    """Image features (1, N, dim) -> relevance (S, N) by attention rollout (Abnar & Zuidema 2020):
    each layer's head-averaged attention with the residual as 0.5 identity, multiplied through the
    layers; a sentence's relevance of a patch is what the positions predicting its tokens draw
    from that image slot. The comparison the deletion test chose gradient x input over."""
    probs = attention_maps(tf, feats)
    T = probs[0].shape[0]
    rollout = torch.eye(T, device=probs[0].device)
    for a in probs:  # first layer first: rollout = A_L ... A_1
        rollout = (0.5 * a + 0.5 * torch.eye(T, device=a.device)) @ rollout
    N, shift = feats.shape[1], feats.shape[1] - 1
    image = rollout[:, tf.image_at : tf.image_at + N]  # (T, N)
    return torch.stack([image[a + shift - 1 : b + shift - 1].sum(0) for a, b in tf.token_spans]) if tf.token_spans else image[:0]


@torch.no_grad()
def deletion_drops(tf: TeacherForcing, feats: Tensor, relevance: Tensor, fraction: float, n_random: int,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Image features (1, N, dim), relevance (S, N) -> each sentence's drop (S,) with its top
    patches removed, and its mean drop (S,) with random patches removed."""
    N = feats.shape[1]
    k = max(1, round(fraction * N))
    mean = feats.mean(1)  # (1, dim)
    full = tf.logprobs(feats)  # (S,)
    top = []
    for s in range(relevance.shape[0]):
        x = feats.clone()
        x[0, relevance[s].topk(k).indices] = mean
        top.append(full[s] - tf.logprobs(x)[s])
    random = torch.zeros_like(full)
    for _ in range(n_random):
        x = feats.clone()
        x[0, torch.randperm(N, generator=generator)[:k]] = mean
        random += (full - tf.logprobs(x)) / n_random
    return torch.stack(top), random


def random_model(grid: int, seed: int, vocab_size: int, lm_head_scale: float) -> LlavaRad:
    """The demo's tiny tower (at grid x grid patches) and decoder, every matrix drawn at unit output
    scale and the LM head scaled up, so the next-token distribution is peaked and moves with the image."""
    torch.manual_seed(seed)
    llm = replace(LLAMA_PRESETS["tiny"], vocab_size=vocab_size)
    model = LlavaRad(VisionTower(replace(TINY_TOWER, image_size=TINY_TOWER.patch_size * grid)),
                     Projector(TINY_TOWER.width, llm.dim), Llama(llm))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
        model.llm.lm_head.weight.mul_(lm_head_scale)
    return model.eval()


def xray(seed: int, size: tuple[int, int] = (224, 224)) -> Image.Image:
    return Image.fromarray((xray_like(seed, size) * 255).astype("uint8")).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="random models")
    p.add_argument("--images", type=int, default=3, help="images per model")
    p.add_argument("--lm-head-scale", type=float, default=4.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny shapes: one thread beats two on a busy 2-core machine
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(tokenizer_model())
        tokenizer = Tokenizer(str(Path(tmp) / "tokenizer.model"))
    g = torch.Generator().manual_seed(0)
    drops = {(m, f): [] for m in ("gradient x input", "attention rollout", "random") for f in FRACTIONS}
    for seed in range(args.seeds):
        model = random_model(8, seed, tokenizer.vocab_size, args.lm_head_scale)
        for i in range(args.images):
            feats = model.encode_images(preprocess(xray(100 * seed + i), model.tower.cfg.image_size)[None]).detach()
            for text in TEXTS:
                tf = TeacherForcing(model, tokenizer, build_question(None), text)
                grad, _ = gradient_relevance(tf, feats)
                rollout = rollout_relevance(tf, feats)
                for f in FRACTIONS:
                    top, rand = deletion_drops(tf, feats, grad, f, 5, g)
                    drops["gradient x input", f] += top.tolist()
                    drops["random", f] += rand.tolist()
                    drops["attention rollout", f] += deletion_drops(tf, feats, rollout, f, 1, g)[0].tolist()
    n = len(drops["random", FRACTIONS[0]])
    print(f"mean log-probability drop over {n} sentences ({args.seeds} models x {args.images} images x {len(TEXTS)} reports), "
          f"lm head x{args.lm_head_scale}")
    print("| method | " + " | ".join(f"top {f:.0%}" for f in FRACTIONS) + " |")
    print("|---|" + "---|" * len(FRACTIONS))
    for m in ("gradient x input", "attention rollout", "random"):
        print(f"| {m} | " + " | ".join(f"{sum(drops[m, f]) / n:.3f}" for f in FRACTIONS) + " |")

    model = random_model(37, 0, tokenizer.vocab_size, args.lm_head_scale)
    image, text = xray(0, (500, 600)), TEXTS[1]
    explain(model, tokenizer, image, None, text)  # warm up
    cpu = []
    for _ in range(3):
        t0 = time.process_time()
        expl = explain(model, tokenizer, image, None, text)
        cpu.append(time.process_time() - t0)
    print(f"explain at 37 x 37 patches ({len(expl.sentences)} sentences, 600 x 500 image), tiny model, one CPU thread: "
          f"{min(cpu):.2f} s CPU time (best of 3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
