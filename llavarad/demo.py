"""A tiny random LLaVA-Rad to try every command on a CPU in seconds, without the 14 GB of weights.

    python -m llavarad.demo DIR

writes, in the real layouts (docs/release-format.md):
  DIR/base/               a Llama folder: config.json, model.safetensors, tokenizer.model
  DIR/release/            a release folder, written by the training code's own writer (release.py)
  DIR/images/             synthetic chest-X-ray-like PNGs (one of them 16-bit)
  DIR/queries.jsonl       {"id", "image", "reason"?, "reference"} per line, for infer.py --query-file
  DIR/annotations.json    the same images in the PhysioNet annotation layout, for train.py

Every weight is random and the texts it writes are meaningless: this checks that the programs run,
not what they say. The tokenizer is a 400-piece SentencePiece model with Llama's settings, trained
here on a few radiology sentences.
"""

import argparse
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import save_file

from llavarad.model.config import LLAMA_PRESETS, TOWER_CKPT, TOWER_JSON, LlamaConfig, LoRAConfig
from llavarad.model.llama import Llama
from llavarad.model.llava import Projector
from llavarad.model.prompt import SYSTEM
from llavarad.model.vision import VisionConfig, VisionTower
from llavarad.model.weights import TRUNK_PREFIX, ours_to_hf
from llavarad.train.release import save_lora_release

FINDINGS = [
    "Mild cardiomegaly. No focal consolidation, pleural effusion or pneumothorax.",
    "The lungs are clear. The cardiomediastinal silhouette is within normal limits.",
    "Heart size is normal. There is no pulmonary edema.",
    "Left basilar atelectasis. Small right pleural effusion, unchanged since 2019.",
    "Endotracheal tube terminates 4.5 cm above the carina. Nasogastric tube in the stomach.",
    "Right internal jugular central venous catheter tip in the mid SVC.",
    "Moderate pulmonary edema with bilateral perihilar opacities, worse than prior.",
    "Patchy opacity in the right lower lobe concerning for pneumonia in the appropriate clinical setting.",
    "No acute cardiopulmonary process. Degenerative changes of the thoracic spine.",
    "Status post median sternotomy and CABG. Stable mild enlargement of the cardiac silhouette.",
]
REASONS = [
    "Fever, cough; evaluate for pneumonia. History of COPD and 3 prior admissions.",
    "Chest pain, rule out acute process. Patient is 67 years old.",
]
# The tokenizer's training text: Llama's prompt pieces, findings and reasons.
CORPUS = [
    SYSTEM,
    "USER: Provide a description of the findings in the radiology image given the following indication: "
    "Shortness of breath. ASSISTANT:",
    "USER: Provide a description of the findings in the radiology image. ASSISTANT:",
    *FINDINGS,
    *REASONS,
]
N_IMAGES = 8
TINY_TOWER = VisionConfig(image_size=56, patch_size=14, width=32, depth=3, heads=2, mlp_hidden=128)  # 16 patches
TINY_LORA = LoRAConfig(r=8, alpha=16.0, dropout=0.05)


def tokenizer_model() -> bytes:
    """A SentencePiece model with the settings of Llama's tokenizer.model: BPE with byte fallback,
    <unk>=0 <s>=1 </s>=2, a dummy-prefix space, identity normalization, digits split one by one."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=out, model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return out.getvalue()


def llama_config_json(cfg: LlamaConfig) -> dict:
    """The Hugging Face config.json of a Llama (the fields LlamaConfig.from_hf reads, and the usual rest)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    }


def write_base(folder: Path, seed: int = 0) -> Llama:
    """A random Llama in the layout of lmsys/vicuna-7b-v1.5 (one safetensors file, HF key names)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(tokenizer_model())
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    cfg = replace(LLAMA_PRESETS["tiny"], vocab_size=sp.get_piece_size())  # 2 layers, width 64
    torch.manual_seed(seed)
    llm = Llama(cfg)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones, so a misplaced norm would show
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(3)  # sharper attention than nn.Linear's init: the text then depends on the image and reason
        # Zero logits for the byte pieces: random bytes would decode to invalid UTF-8 ("\ufffd").
        llm.lm_head.weight[[i for i in range(cfg.vocab_size) if sp.is_byte(i)]] = 0
    save_file({ours_to_hf(k): v.contiguous() for k, v in llm.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(llama_config_json(cfg), indent=2))
    return llm


def write_tower(folder: Path, seed: int = 0, cfg: VisionConfig = TINY_TOWER) -> VisionTower:
    """A random ViT in the layout of the release's tower: an open_clip model json and an open_clip
    training checkpoint {"state_dict": {"module.visual.trunk.<timm key>": tensor}} with every block
    and the final norm, as the real one (the loader skips the last block and the norm)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tower = VisionTower(cfg, select_layer=cfg.depth)  # all blocks
    with torch.no_grad():
        tower.cls_token.normal_(0, 0.5)
        tower.pos_embed.normal_(0, 0.5)
    trunk = dict(tower.state_dict())
    trunk["norm.weight"], trunk["norm.bias"] = torch.ones(cfg.width), torch.zeros(cfg.width)
    state = {f"module.{TRUNK_PREFIX}{k}": v for k, v in trunk.items()}
    torch.save({"epoch": 1, "name": "demo", "state_dict": state}, folder / TOWER_CKPT)
    model_json = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "vit_base_patch14_dinov2.lvd142m", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": cfg.image_size,
                       "head_width": cfg.width // cfg.heads},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "context_length": 256},
    }
    (folder / TOWER_JSON).write_text(json.dumps(model_json, indent=2))
    return tower


def write_release(folder: Path, base: Path, llm: Llama, tower_dir: Path, seed: int = 0) -> None:
    """A random projector and LoRA adapter, saved by the training stage's writer (release.save_lora_release)."""
    g = torch.Generator().manual_seed(seed + 1)
    projector = {k: v.detach() for k, v in Projector(TINY_TOWER.width, llm.cfg.dim).state_dict().items()}
    adapter = {}
    for key, w in llm.state_dict().items():
        module, _ = key.rsplit(".", 1)  # "layers.0.attn.q_proj"
        if module.rsplit(".", 1)[-1] in TINY_LORA.targets:
            out_features, in_features = w.shape
            # Both A and B random (training starts B at zero), so that the adapter changes the output.
            adapter[f"{module}.lora_A"] = torch.randn(TINY_LORA.r, in_features, generator=g) * 0.1
            adapter[f"{module}.lora_B"] = torch.randn(out_features, TINY_LORA.r, generator=g) * 0.1
    save_lora_release(folder, projector, adapter, TINY_LORA, base, "lmsys/vicuna-7b-v1.5", tower_dir)


def xray_like(seed: int, size: tuple[int, int] = (240, 200)) -> np.ndarray:
    """A grayscale picture shaped like a frontal chest X-ray (h, w) in [0, 1]: a bright body, two
    dark lung fields crossed by ribs, a bright spine and heart, noise. Nothing in it is real."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]  # (2, h, w) in [0, 1)
    body = ((x - 0.5) / 0.47) ** 2 + ((y - 0.6) / 0.6) ** 2 < 1
    image = 0.15 + 0.55 * body
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.18, 0.22)
        lung = ((x - cx) / rng.uniform(0.14, 0.17)) ** 2 + ((y - 0.5) / rng.uniform(0.3, 0.34)) ** 2 < 1
        ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (y * 9 + 2 * (x - cx) ** 2 * 9))
        image = np.where(lung, 0.2 + 0.12 * ribs, image)
    heart = ((x - 0.53) / rng.uniform(0.12, 0.2)) ** 2 + ((y - 0.68) / 0.14) ** 2 < 1
    spine = np.abs(x - 0.5) < 0.04
    image = np.where(heart | spine, 0.75, image)
    return np.clip(image + rng.normal(0, 0.03, (h, w)), 0, 1)


def write_images(folder: Path, n: int = N_IMAGES) -> list[str]:
    """n PNGs of different sizes, named cxr<i>.png; the last one 16-bit (infer reads those too)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        pixels = xray_like(i, (240 + 8 * i, 200 + 4 * i))
        name = f"cxr{i}.png"
        if i == n - 1:
            Image.fromarray((pixels * 65535).astype(np.uint16)).save(folder / name)
        else:
            Image.fromarray((pixels * 255).astype(np.uint8), mode="L").save(folder / name)
        names.append(name)
    return names


def write_queries(path: Path, images: list[str]) -> None:
    """A JSONL query file; references are real-sounding findings, unrelated to the pictures."""
    lines = []
    for i, image in enumerate(images):
        record = {"id": f"demo{i}", "image": image, "reference": FINDINGS[i % len(FINDINGS)]}
        if i % 3:
            record["reason"] = REASONS[i % len(REASONS)]
        lines.append(json.dumps(record) + "\n")
    path.write_text("".join(lines))


def write_annotations(path: Path, images: list[str]) -> None:
    """The PhysioNet LLaVA-Rad annotation layout (what train.py's mimic loaders read)."""
    records = []
    for i, image in enumerate(images):
        records.append({
            "id": f"demo{i}", "image": "mimic/" + image, "view": "PA" if i % 2 else "AP",
            "generate_method": "rule-based", "reason": REASONS[i % len(REASONS)] if i % 3 else None,
            "conversations": [
                {"from": "human", "value": "<image>\nProvide a description of the findings in the radiology image."},
                {"from": "gpt", "value": FINDINGS[i % len(FINDINGS)]},
            ],
        })
    path.write_text(json.dumps(records, indent=1))


def write_demo(root: Path, seed: int = 0) -> None:
    """Everything above, under root (which must not exist or be empty)."""
    llm = write_base(root / "base", seed)
    write_tower(root / "release", seed)  # the tower files live in the release folder, as released
    write_release(root / "release", root / "base", llm, root / "release", seed)
    images = write_images(root / "images")
    write_queries(root / "queries.jsonl", images)
    write_annotations(root / "annotations.json", images)


def try_commands(root: Path) -> str:
    """The README's commands, pointed at the demo folders."""
    d, run = root, root / "runs"
    models = f"--model {d}/release --base {d}/base"
    train = (f"--data {d}/annotations.json --image-folder {d}/images --base {d}/base --tower {d}/release "
             "--global-batch 4 --micro-batch 2 --max-steps 2 --num-workers 0 --dtype float32")
    return "\n".join([
        f"python infer.py {d}/images/cxr0.png --reason 'Cough.' {models}",
        f"python infer.py --query-file {d}/queries.jsonl --image-folder {d}/images --output {d}/preds.jsonl {models}",
        f"python evaluate.py {d}/preds.jsonl --output-dir {d}/eval",
        f"python train.py --stage pretrain --config configs/pretrain.toml {train} --output {run}/pretrain",
        f"python train.py --stage lora --config configs/lora.toml {train} --projector {run}/pretrain/mm_projector.bin "
        f"--output {run}/lora",
        f"python infer.py {d}/images/cxr1.png --model {run}/lora --base {d}/base",
        f"python -m llavarad.export {models} --quantize int8 --output {d}/export-int8",
        f"python infer.py {d}/images/cxr0.png --reason 'Cough.' --model {d}/export-int8",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="where to write base/, release/, images/, queries.jsonl, annotations.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    args = p.parse_args(argv)
    root = Path(args.folder)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        print(f"error: {root}: exists and is not an empty folder; choose a new one", file=sys.stderr)
        return 1
    write_demo(root, args.seed)
    print(f"Wrote a tiny RANDOM LLaVA-Rad to {root}: random weights, meaningless text. Try:\n")
    print(try_commands(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
