"""Images and query files for the batch-inference tests, next to the lead's tiny release."""

import json
from pathlib import Path

import numpy as np
import pytest
from _release_fixtures import TinyRelease, write_tiny_release
from PIL import Image

# Prompts of different lengths: no reason, short reasons, a long one with a newline.
REASONS = [
    None, "Cough.", "Shortness of breath\nand fever for three days, rule out pneumonia.", None,
    "Evaluate line placement after central venous catheter insertion in the right internal jugular vein.",
    "Chest pain.", None,
]


def shared_tiny_release(tmp_path_factory: pytest.TempPathFactory) -> TinyRelease:
    """One tiny release for all the inference test modules of a session (it takes seconds to write)."""
    global _RELEASE
    if _RELEASE is None:
        _RELEASE = write_tiny_release(tmp_path_factory.mktemp("tiny_release"))
    return _RELEASE


_RELEASE: TinyRelease | None = None


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n random chest-X-ray-like PNGs of different sizes and modes; returns their file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        pixels = rng.integers(0, 256, (h, w, 3) if i % 2 else (h, w), dtype=np.uint8)
        name = f"p{i}/img{i}.png"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def write_corrupt(folder: Path, name: str = "broken.png") -> str:
    (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return name


def write_jsonl(path: Path, images: list[str], reasons: list[str | None]) -> Path:
    """{"id", "image", "reason"?, "reference"} per line, ids in reverse order so sorting by id would show."""
    rows = []
    for i, (image, reason) in enumerate(zip(images, reasons)):
        row = {"id": f"q{len(images) - i:02d}", "image": image, "reference": f"Finding {i}."}
        if reason is not None:
            row["reason"] = reason
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_annotation(path: Path, images: list[str], reasons: list[str | None]) -> Path:
    """The PhysioNet LLaVA-Rad annotation layout; odd records are filtered out by mimic_test_findings."""
    rows = []
    for i, (image, reason) in enumerate(zip(images, reasons)):
        rows.append({
            "id": f"s{i}", "image": "mimic/" + image, "reason": reason, "view": "LATERAL" if i == 3 else "PA",
            "generate_method": "gpt4" if i == 5 else "rule-based",
            "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"Finding {i}."}],
        })
    path.write_text(json.dumps(rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cpu_without_avx512(capability: str) -> dict[str, str]:
    """Environment under which torch runs, on this machine, the kernels of a CPU without AVX512:
    ATen's ("avx2", or "default": neither AVX2) and oneDNN's (AVX2, SSE4.1) together, as such a CPU
    has them (ATen's alone lets oneDNN's AVX512 bfloat16 packing meet ATen's AVX2 checks and fail)."""
    return {"ATEN_CPU_CAPABILITY": capability, "ONEDNN_MAX_CPU_ISA": {"avx2": "AVX2", "default": "SSE41"}[capability]}
