"""Tiny in-memory LLaVA-Rad models for the heatmap tests: a real patch grid (the tiny release's
tower sees 2 x 2 patches, too few for a map) and random weights scaled so the image matters."""

import math

import numpy as np
import torch
from _sp_fixtures import train_tiny_sp
from _vision_fixtures import randomize_
from PIL import Image

from llavarad.model.config import LLAMA_PRESETS
from llavarad.model.llama import Llama
from llavarad.model.llava import LlavaRad, Projector
from llavarad.model.tokenizer import Tokenizer
from llavarad.model.vision import VisionConfig, VisionTower

FINDINGS = [
    "Mild cardiomegaly. No focal consolidation, pleural effusion or pneumothorax.",
    "The lungs are clear. Heart size is normal. There is no pulmonary edema.",
    "Left basilar atelectasis. Small right pleural effusion, unchanged since 2019.",
]


def tiny_tokenizer(tmp_path) -> Tokenizer:
    return Tokenizer(str(train_tiny_sp(tmp_path)))


def tiny_model(grid: int = 8, seed: int = 0, lm_head_scale: float = 4.0) -> LlavaRad:
    """A tower over a grid x grid patch grid, the projector and the tiny decoder, all random.

    Every weight is drawn at unit output variance (`randomize_`) and the LM head is scaled up, so
    the next-token distribution is peaked and moves when the image moves: a sentence's
    log-probability then depends on the image, and a deletion test measures something.
    """
    torch.manual_seed(seed)
    tower = VisionTower(VisionConfig(image_size=14 * grid, width=32, depth=3, heads=2, mlp_hidden=64))
    model = LlavaRad(tower, Projector(32, 64), Llama(LLAMA_PRESETS["tiny"]))
    randomize_(model, seed)
    with torch.no_grad():
        model.llm.lm_head.weight.mul_(lm_head_scale)
    return model.eval()


def blob_image(seed: int, w: int = 112, h: int = 112) -> Image.Image:
    """A grey image of a few bright Gaussian blobs on noise: patches that differ from each other."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = rng.normal(60, 15, (h, w))
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 20)
        img += rng.uniform(80, 160) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return Image.fromarray(np.uint8(np.clip(img, 0, 255))).convert("RGB")


def patch_count(model: LlavaRad) -> int:
    return int(math.isqrt(model.tower.num_patches)) ** 2
