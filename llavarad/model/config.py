"""Flat configs for the decoder and LoRA, with presets and readers for the released json files."""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from llavarad.jsonl import read_text

# The dtypes a model runs in, by the name the command lines and an export's manifest use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    hidden_dim: int = 11008  # SwiGLU inner width ("intermediate_size")
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf(cls, path: str | Path) -> "LlamaConfig":
        """Read a Hugging Face Llama `config.json` (the base folder's or the LLaVA release's)."""
        cfg = read_json(path)
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                hidden_dim=cfg["intermediate_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=cfg.get("rope_theta", 10000.0),
                max_seq_len=cfg.get("max_position_embeddings", 4096),
            )
        except KeyError as e:
            raise ValueError(f"{path}: missing field {e.args[0]!r} in the Llama config") from None


LLAMA_PRESETS = {
    "tiny": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=160),
}


@dataclass
class LoRAConfig:
    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# The vision tower's open_clip model json and checkpoint, as the release names them (the one
# definition; weights.locate_tower finds them).
TOWER_JSON, TOWER_CKPT = "biomedclipcxr_518.json", "biomedclipcxr_518_checkpoint.pt"


@dataclass
class MultimodalConfig:
    """The LLaVA fields of the release's `config.json` that shape the model around the decoder."""

    mm_hidden_size: int = 768
    mm_vision_select_layer: int = -2
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_tower_config: str = TOWER_JSON
    mm_vision_tower_checkpoint: str = TOWER_CKPT

    @classmethod
    def from_hf(cls, path: str | Path) -> "MultimodalConfig":
        cfg = read_json(path)
        known = {f.name: cfg[f.name] for f in fields(cls) if cfg.get(f.name) is not None}
        mm = cls(**known)
        if mm.mm_projector_type != "mlp2x_gelu":
            raise ValueError(f"{path}: mm_projector_type {mm.mm_projector_type!r} is not supported (only mlp2x_gelu)")
        return mm


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
