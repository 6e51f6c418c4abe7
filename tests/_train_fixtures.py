"""A tiny training world in the real layouts: base Llama folder (HF weights + tokenizer.model), tower
folder (open_clip json + checkpoint), PhysioNet-style annotation JSON and PNG images."""

import json
from pathlib import Path

import numpy as np
import torch
from _llama_fixtures import tiny_hf_llama, write_base
from _sp_fixtures import train_tiny_sp
from _vision_fixtures import write_tiny_tower
from PIL import Image

from llavarad.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Tokenizer

FINDINGS = [
    "Mild cardiomegaly.",
    "The lungs are clear.",
    "Heart size is normal.",
    "Left basilar atelectasis.",
    "Small right pleural effusion.",
    "No acute cardiopulmonary process.",
    "Moderate pulmonary edema.",
    "Patchy opacity in the right lower lobe.",
]
REASONS = ["Shortness of breath.", None, "Fever, cough; evaluate for pneumonia.", None,
           "Chest pain, rule out acute process.", None, "History of COPD.", None]
VOCAB = 512  # >= the tiny tokenizer's pieces


N_IMAGE = 4  # the tiny tower: 28 px images, 14 px patches


def write_base_and_tower(root: Path, reads_context: bool = True) -> tuple[Path, Path]:
    """(base_dir, tower_dir): transformers' LlamaForCausalLM and a timm tower, in the release layouts.

    A random decoder barely reads its context, so no projector could steer it: stage 1 could not
    overfit. With `reads_context`, the decoder is first trained (briefly, with transformers) to
    write findings k after N_IMAGE copies of an unused token "word k", the way a real LM reads
    its prompt; stage 1 then has to map image k's features onto something the decoder reads as word k.
    """
    torch.manual_seed(0)
    hf = tiny_hf_llama(vocab_size=VOCAB)
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(str(train_tiny_sp(base)))
    if reads_context:
        _teach_to_read(hf, tokenizer)
    write_base(hf, base)
    write_tiny_tower(root / "tower")
    return base, root / "tower"


def _teach_to_read(hf, tokenizer: Tokenizer, steps: int = 60) -> None:
    rows = []
    for k, findings in enumerate(FINDINGS):
        ids, labels = tokenizer.encode_plain(findings)
        at = ids.index(IMAGE_TOKEN_INDEX)
        word = VOCAB - 1 - k  # above the tokenizer's pieces: never in a text
        rows.append((ids[:at] + [word] * N_IMAGE + ids[at + 1 :], labels[:at] + [IGNORE_INDEX] * N_IMAGE + labels[at + 1 :]))
    T = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r, _ in rows])
    labels = torch.tensor([l + [IGNORE_INDEX] * (T - len(l)) for _, l in rows])
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-2)
    hf.train()
    for _ in range(steps):
        hf(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    hf.eval()


def annotation(i: int, findings: str, reason: str | None, view: str = "PA") -> dict:
    """One record of the PhysioNet LLaVA-Rad MIMIC-CXR annotation JSON."""
    return {
        "id": f"s{i}",
        "image": f"mimic/p10/s{i}.png",
        "generate_method": "rule-based" if i % 2 else "gpt4",
        "reason": reason,
        "view": view,
        "conversations": [
            {"from": "human", "value": "<image>\nProvide a description of the findings in the radiology image."},
            {"from": "gpt", "value": findings},
        ],
    }


def write_data(root: Path, n: int = 8, name: str = "train.json", seed: int = 0) -> tuple[Path, Path]:
    """(annotation JSON, image folder) with n records, each with its own random grayscale PNG."""
    images = root / "images"
    (images / "p10").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        records.append(annotation(i, FINDINGS[i % len(FINDINGS)], REASONS[i % len(REASONS)]))
        pixels = rng.integers(0, 256, size=(36, 30), dtype=np.uint8)  # not square: exercises resize + crop
        Image.fromarray(pixels, mode="L").save(images / "p10" / f"s{i}.png")
    path = root / name
    path.write_text(json.dumps(records))
    return path, images


def train_args(root: Path, base: Path, tower: Path, data: Path, images: Path, output: str, stage: str = "pretrain",
               **overrides) -> list[str]:
    """Command-line arguments for a tiny CPU run (float32, so runs compare to 1e-5)."""
    settings = {
        "stage": stage, "data": data, "image_folder": images, "base": base, "tower": tower, "output": root / output,
        "global_batch": 8, "micro_batch": 4, "max_steps": 30, "lr": 1e-2, "dtype": "float32", "num_workers": 0,
        "log_every": 1, "save_every": 0, "max_len": 256, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "grad_clip": 1.0,  # the configs have none (official); the tests keep clipping exercised, FSDP's sharded norm too
    }
    settings.update(overrides)
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return args


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
