"""End to end: infer.py on a tiny release == a reference pipeline assembled from transformers, timm,
peft and open_clip following docs/release-format.md and docs/prompt.md."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from _release_fixtures import write_tiny_release
from PIL import Image
from transformers import LlamaTokenizer

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MAX_NEW = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("llavarad"))


def reference_findings(tiny, image_path: Path, reason: str | None) -> str:
    tok = LlamaTokenizer(vocab_file=str(tiny.base / "tokenizer.model"), legacy=True)
    if reason is None:
        question = "Provide a description of the findings in the radiology image."
    else:
        question = "Provide a description of the findings in the radiology image given the following indication: " + reason.replace("\n", " ")
    prompt = SYSTEM + " USER: <image>\n" + question + " ASSISTANT:"
    before, after = (tok(c).input_ids for c in prompt.split("<image>"))  # the official tokenizer_image_token
    assert before[0] == tok.bos_token_id and after[0] == tok.bos_token_id
    ids_before, ids_after = torch.tensor(before), torch.tensor(after[1:])

    size = tiny.tower.patch_embed.img_size[0]
    transform = open_clip.image_transform(size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
    pixels = transform(Image.open(image_path).convert("RGB"))[None]
    with torch.no_grad():
        t = tiny.tower
        x = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(pixels))))
        hidden = []
        for blk in t.blocks:
            x = blk(x)
            hidden.append(x)
        feats = hidden[-2][:, 1:]  # hidden_states[-2], CLS dropped
        p = tiny.projector
        feats = F.linear(F.gelu(F.linear(feats, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])[0]

        llm = copy.deepcopy(tiny.peft_model).merge_and_unload()
        emb = llm.get_input_embeddings()
        embeds = torch.cat([emb(ids_before), feats, emb(ids_after)])[None]
        out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                           max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=0)
    text = tok.batch_decode(out, skip_special_tokens=True)[0].strip()
    return text.removesuffix("</s>").strip()


def run_infer(tiny, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "infer.py"), *map(str, args), "--model", str(tiny.release), "--base", str(tiny.base),
           "--max-new-tokens", str(MAX_NEW), "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("mode, reason", [("RGB", None), ("L", "Shortness of breath.\nEvaluate for pneumonia.")])
def test_infer_matches_reference_pipeline(tiny, tmp_path, mode, reason):
    rng = np.random.default_rng(0)
    shape = (45, 37, 3) if mode == "RGB" else (33, 52)  # non-square, portrait and landscape
    path = tmp_path / "chest.png"
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    expected = reference_findings(tiny, path, reason)
    proc = run_infer(tiny, path, *(["--reason", reason] if reason else []))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    assert len(expected) > 0
