"""Images + reasons for exam -> findings texts: preprocess, prompt, splice, greedy decode, detokenize."""

import torch
from PIL import Image

from llavarad.generate import greedy_generate
from llavarad.images import preprocess
from llavarad.model import LlavaRad
from llavarad.tokenizer import Tokenizer, build_prompt, build_question


@torch.no_grad()
def describe(model: LlavaRad, tokenizer: Tokenizer, images: list[Image.Image], reasons: list[str | None], max_new_tokens: int = 256) -> list[str]:
    """One findings text per (image, reason) pair, generated in one batch."""
    device = model.llm.lm_head.weight.device
    pixels = torch.stack([preprocess(im, model.tower.cfg.image_size) for im in images]).to(device)  # (B, 3, S, S)
    ids = [tokenizer.encode_prompt(build_prompt(build_question(r))) for r in reasons]
    embeds = model.embed(ids, model.encode_images(pixels))  # B x (T_b, dim)
    new_tokens = greedy_generate(model.llm, embeds, max_new_tokens, tokenizer.eos_id)
    return [tokenizer.decode(t) for t in new_tokens]
