"""The inference pipeline, written once: load a model, turn a question into prompt ids, images into
spliced embeddings, and (image, reason) pairs into findings.

    load(...) -> (LlavaRad, Tokenizer)      a release folder (LoRA merged), or an export; dtype/device, quantization
    prompt_ids(tokenizer, question)          the Vicuna v1 prompt's token ids, one image token in them
    context_overflow(model, ids, new)        why a prompt cannot be generated, or None
    embed_images(model, pixels, prompts)     preprocessed images + prompt ids -> each row's embeddings
    describe(model, tokenizer, ...)          the whole path for a batch of PIL images, greedy

infer.py, serve.py, the batch runner, the server's scheduler and explain call these. Nothing here
reads query files or speaks HTTP; it may use the model room and generation only.
"""

import sys
import time

import torch
from PIL import Image
from torch import Tensor

from llavarad.dist import print0
from llavarad.infer.export import is_export, load_export
from llavarad.infer.generate import greedy_generate
from llavarad.infer.images import preprocess
from llavarad.model.llava import LlavaRad
from llavarad.model.prompt import build_prompt, build_question
from llavarad.model.tokenizer import Tokenizer
from llavarad.model.weights import load_llavarad

def default_dtype(device: torch.device, quantize: str | None = None) -> torch.dtype:
    """bfloat16 on a GPU, and for a quantized decoder on a CPU: torch's packed CPU kernels, which
    decode, take 5x (int8) and 25x (int4) their bfloat16 time with float32 activations (one 11008 x
    4096 layer, AVX512 and AVX2 alike: int8 40.8 / 7.8 ms, int4 133 / 5.4 ms). float32 for a float
    model on a CPU: the reference's numbers."""
    return torch.bfloat16 if device.type == "cuda" or quantize else torch.float32


def device_problem(name: str) -> str | None:
    """Why `name` cannot run the model here, or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return "not a device name (cpu, cuda, cuda:N or mps)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available here"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA GPU(s)"
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            return "MPS is not available here"
    elif device.type != "cpu":
        return "not supported (cpu, cuda, cuda:N or mps)"
    return None


def load(model: str, base: str, device: torch.device, dtype: torch.dtype | None, tower: str | None = None,
         quantize: str | None = None) -> tuple[LlavaRad, Tokenizer]:
    """The release `model` over the base Llama `base` (folders or hub repo ids), or an export folder
    (`python -m llavarad.export`: everything in it, merged and quantized already; `base` and `tower`
    unused), timed on stderr. `dtype` None: the export's own, else `default_dtype(device, quantize)`."""
    t0 = time.time()
    if is_export(model):
        loaded = load_export(model, device, dtype, quantize)
    else:
        loaded = load_llavarad(model, base, dtype or default_dtype(device, quantize), device, tower_dir=tower, quantize=quantize)
    print0(f"loaded {model} in {time.time() - t0:.1f}s", file=sys.stderr)
    return loaded


def prompt_ids(tokenizer: Tokenizer, question: str, answer: str | None = None) -> list[int]:
    """The prompt's token ids for a question (`build_question(reason)`, or a record's own), with one
    IMAGE_TOKEN_INDEX; with `answer`, the assistant's text follows (teacher forcing)."""
    text = build_prompt(question)
    return tokenizer.encode_prompt(text if answer is None else text + " " + answer)


def context_overflow(model: LlavaRad, ids: list[int], max_new_tokens: int) -> str | None:
    """Why a prompt cannot be generated, or None: its positions (the image token becomes the tower's
    patches) plus max_new_tokens must fit in the decoder's context, max_position_embeddings, the
    positions the model was trained with."""
    positions, context = model.positions(ids), model.llm.cfg.max_seq_len
    if positions + max_new_tokens <= context:
        return None
    return (f"the prompt takes {positions} positions (image included) + max_new_tokens {max_new_tokens} = "
            f"{positions + max_new_tokens}, over the decoder's context of {context} (max_position_embeddings)")


def embed_images(model: LlavaRad, pixels: Tensor, prompts: list[list[int]]) -> list[Tensor]:
    """Preprocessed images (B, 3, S, S) + each one's prompt ids -> each row's input embeddings
    (T_b, dim), unpadded: padding happens where a batch forms (prefill)."""
    feats = model.encode_images(pixels.to(model.device))  # (B, N, dim)
    return model.embed(prompts, feats)


@torch.no_grad()
def describe(model: LlavaRad, tokenizer: Tokenizer, images: list[Image.Image], reasons: list[str | None],
             max_new_tokens: int = 256) -> list[str]:
    """One findings text per (image, reason) pair, generated in one batch: preprocess, prompt,
    splice, greedy decode, detokenize. A prompt too long for the decoder's context is a ValueError."""
    ids = [prompt_ids(tokenizer, build_question(r)) for r in reasons]
    for row in ids:
        if problem := context_overflow(model, row, max_new_tokens):
            raise ValueError(problem)
    pixels = torch.stack([preprocess(im, model.tower.cfg.image_size) for im in images])  # (B, 3, S, S)
    new_tokens = greedy_generate(model.llm, embed_images(model, pixels, ids), max_new_tokens, tokenizer.eos_id)
    return [tokenizer.decode(t) for t in new_tokens]
