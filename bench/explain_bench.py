"""Heatmaps on the CPU: the deletion curve that chose the relevance method, and what `--explain` costs.

    PYTHONPATH=.:tests python bench/explain_bench.py                 # about 10 s of CPU
    PYTHONPATH=.:tests python bench/explain_bench.py --seeds 1 --images 1   # seconds

Tiny random models (tests/_explain_fixtures.py: an 8 x 8 patch grid, the 2-layer tiny decoder, the
LM head scaled so the image matters), blob images, the fixtures' three findings texts (7
sentences). For each method (gradient x input, attention rollout) and fraction of patches, the
mean over models, images and sentences of the log-probability drop when the method's top patches
are replaced by the mean patch, against the mean drop for random patches (5 draws).
Then the time of `explain` (teacher forcing, gradients, overlays) on one report at the real grid
(37 x 37 patches, a 518 px tower at tiny width) on one CPU thread, as CPU time (the machine is shared).
"""

import argparse
import time
from pathlib import Path

import torch
from _explain_fixtures import FINDINGS, blob_image, tiny_model, tiny_tokenizer

from llavarad.explain.faithfulness import deletion_drops
from llavarad.explain.relevance import TeacherForcing, explain, gradient_relevance, rollout_relevance
from llavarad.infer.images import preprocess
from llavarad.model.prompt import build_question

FRACTIONS = (0.05, 0.1, 0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="random models")
    p.add_argument("--images", type=int, default=3, help="images per model")
    p.add_argument("--lm-head-scale", type=float, default=4.0)
    p.add_argument("--tmp", default="/tmp", help="where the tiny tokenizer is written")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny shapes: one thread beats two on a busy 2-core machine
    tokenizer = tiny_tokenizer(Path(args.tmp))
    g = torch.Generator().manual_seed(0)
    drops = {(m, f): [] for m in ("gradient x input", "attention rollout", "random") for f in FRACTIONS}
    for seed in range(args.seeds):
        model = tiny_model(seed=seed, lm_head_scale=args.lm_head_scale)
        for i in range(args.images):
            feats = model.encode_images(preprocess(blob_image(100 * seed + i), model.tower.cfg.image_size)[None]).detach()
            for text in FINDINGS:
                tf = TeacherForcing(model, tokenizer, build_question(None), text)
                grad, _ = gradient_relevance(tf, feats)
                rollout = rollout_relevance(tf, feats)
                for f in FRACTIONS:
                    top, rand = deletion_drops(tf, feats, grad, f, 5, g)
                    drops["gradient x input", f] += top.tolist()
                    drops["random", f] += rand.tolist()
                    drops["attention rollout", f] += deletion_drops(tf, feats, rollout, f, 1, g)[0].tolist()
    n = len(drops["random", FRACTIONS[0]])
    print(f"mean log-probability drop over {n} sentences ({args.seeds} models x {args.images} images x 3 reports), "
          f"lm head x{args.lm_head_scale}")
    print("| method | " + " | ".join(f"top {f:.0%}" for f in FRACTIONS) + " |")
    print("|---|" + "---|" * len(FRACTIONS))
    for m in ("gradient x input", "attention rollout", "random"):
        print(f"| {m} | " + " | ".join(f"{sum(drops[m, f]) / n:.3f}" for f in FRACTIONS) + " |")

    model = tiny_model(grid=37, seed=0, lm_head_scale=args.lm_head_scale)
    image, text = blob_image(0, 600, 500), FINDINGS[1]
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
