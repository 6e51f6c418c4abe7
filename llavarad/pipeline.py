"""Images + reasons for exam -> findings texts: preprocess, prompt, splice, greedy decode, detokenize."""

import torch
from PIL import Image

from llavarad.generate import greedy_generate
from llavarad.images import preprocess
from llavarad.model import LlavaRad
from llavarad.tokenizer import Tokenizer, build_prompt, build_question


def context_overflow(model: LlavaRad, ids: list[int], max_new_tokens: int) -> str | None:
    """Why a prompt (token ids with one image token) cannot be generated, or None: its positions
    (the image token becomes the tower's patches) plus max_new_tokens must fit in the decoder's
    context, max_position_embeddings, the positions the model was trained with."""
    positions = len(ids) - 1 + model.tower.num_patches
    context = model.llm.cfg.max_seq_len
    if positions + max_new_tokens <= context:
        return None
    return (f"the prompt takes {positions} positions (image included) + max_new_tokens {max_new_tokens} = "
            f"{positions + max_new_tokens}, over the decoder's context of {context} (max_position_embeddings)")


@torch.no_grad()
def describe(model: LlavaRad, tokenizer: Tokenizer, images: list[Image.Image], reasons: list[str | None], max_new_tokens: int = 256) -> list[str]:
    """One findings text per (image, reason) pair, generated in one batch; a prompt too long for the
    decoder's context is a ValueError."""
    device = model.llm.lm_head.weight.device
    ids = [tokenizer.encode_prompt(build_prompt(build_question(r))) for r in reasons]
    for row in ids:
        if problem := context_overflow(model, row, max_new_tokens):
            raise ValueError(problem)
    pixels = torch.stack([preprocess(im, model.tower.cfg.image_size) for im in images]).to(device)  # (B, 3, S, S)
    embeds, lengths = model.embed(ids, model.encode_images(pixels))
    new_tokens = greedy_generate(model.llm, embeds, lengths, max_new_tokens, tokenizer.eos_id)
    return [tokenizer.decode(t) for t in new_tokens]
