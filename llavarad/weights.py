"""Checkpoint loading: the base Llama folder, the LLaVA-Rad release folder (LoRA adapter merged at
load, projector, vision tower), with the key mapping written out as a table.

Every unknown, missing or wrongly shaped tensor is an error naming the key, the file and the shapes.
"""

import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from llavarad.config import LlamaConfig, MultimodalConfig, read_json
from llavarad.errors import first_line
from llavarad.hub import hub_download
from llavarad.llama import Llama
from llavarad.lora import merge_lora
from llavarad.model import LlavaRad, Projector
from llavarad.quant import QUANTIZED, QuantLinear
from llavarad.tokenizer import Tokenizer
from llavarad.vision import load_tower

# Hugging Face Llama key -> our key; "{}" is the layer index.
LLAMA_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
}
# Buffers that older transformers saved with the weights; we recompute them.
IGNORED_KEYS = {"model.layers.{}.self_attn.rotary_emb.inv_freq"}
OURS_TO_HF = {v: k for k, v in LLAMA_KEYS.items()}

# Where the release keeps its pieces, by file name; config.json may hold paths of the training machine.
TOWER_JSON, TOWER_CKPT = "biomedclipcxr_518.json", "biomedclipcxr_518_checkpoint.pt"
PROJECTOR_PREFIXES = ("base_model.model.", "model.", "mm_projector.")


def template(key: str) -> tuple[str, str | None]:
    """'model.layers.7.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', '7')."""
    m = re.search(r"\.(\d+)\.", key)
    return (key[: m.start()] + ".{}." + key[m.end() :], m.group(1)) if m else (key, None)


def hf_to_ours(key: str) -> str | None:
    """Our key for a Hugging Face Llama key; None for ignored buffers; KeyError when unknown."""
    t, i = template(key)
    if t in IGNORED_KEYS:
        return None
    return LLAMA_KEYS[t].format(i)


def ours_to_hf(key: str) -> str:
    t, i = template(key)
    return OURS_TO_HF[t].format(i)


def resolve_folder(name: str, what: str) -> Path:
    """A local folder, or a Hugging Face repo id downloaded when huggingface_hub is installed."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: {what} folder not found")
    try:
        return hub_download(name)
    except ImportError:
        raise FileNotFoundError(
            f"{name}: no such {what} folder; download it (huggingface-cli download {name} --local-dir DIR) "
            f"and pass DIR, or pip install 'llavarad[hub]' to download it here"
        ) from None
    except ConnectionError as e:
        raise FileNotFoundError(f"{name}: no such {what} folder, and the hub download failed ({e})") from None


def load_file(path: Path) -> dict[str, Tensor]:
    """A whole safetensors or PyTorch checkpoint file, loaded safely onto the CPU."""
    return dict(iter_file(path))


def iter_file(path: Path) -> Iterator[tuple[str, Tensor]]:
    """The tensors of a safetensors or PyTorch checkpoint file, read one at a time onto the CPU: a
    safetensors file tensor by tensor, a (zip) .bin memory-mapped, so a 10 GB shard is never in memory whole."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
            return
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # corrupt file, pickle with code in it, truncated download...
        raise ValueError(f"{path}: cannot read checkpoint ({first_line(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    yield from sd.items()


def checkpoint_files(folder: Path) -> list[Path]:
    """The base folder's weight files: sharded or single, safetensors preferred over .bin."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{folder / index}: no weight_map")
            return [folder / f for f in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, Tensor, Path]]:
    """(key, tensor, file) over all shards, one tensor in memory at a time."""
    for f in checkpoint_files(folder):
        for k, v in iter_file(f):
            yield k, v, f


def load_adapter(folder: Path) -> tuple[dict[str, Tensor], float]:
    """The release's PEFT LoRA as {our module + '.lora_A'/'.lora_B': tensor} and its scale."""
    cfg = read_json(folder / "adapter_config.json")
    try:
        r, alpha = cfg["r"], cfg["lora_alpha"]
    except KeyError as e:
        raise ValueError(f"{folder / 'adapter_config.json'}: missing field {e.args[0]!r}") from None
    scale = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        path = folder / "adapter_model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    adapter = {}
    for key, t in load_file(path).items():
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> layers.0.attn.q_proj.lora_A
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])(?:\.weight)?", key)
        try:
            module = hf_to_ours(m.group(1) + ".weight").removesuffix(".weight")
        except (AttributeError, KeyError):
            raise ValueError(f"{path}: unexpected adapter key {key!r}") from None
        adapter[f"{module}.{m.group(2)}"] = t
    return adapter, scale


def load_llm(base: Path, dtype: torch.dtype, device: str | torch.device, adapter: dict[str, Tensor] | None = None,
             scale: float = 1.0, quantize: str | None = None, trainable_input: bool = False) -> Llama:
    """Build the decoder on the meta device and assign the base weights tensor by tensor, so a 7B
    model never exists twice in memory. A LoRA `adapter` (from `load_adapter`) is merged at `scale`.
    `quantize` ("int8" | "int4"): each linear layer of the blocks is quantized as it is read (see
    llavarad.quant; `trainable_input`: for QLoRA), so memory stays near the quantized size; `dtype`
    is that of the activations and of the weights left unquantized."""
    cfg = LlamaConfig.from_hf(base / "config.json")
    with torch.device("meta"):
        llm = Llama(cfg)
    expected = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    by_module: dict[str, dict[str, Tensor]] = {}
    for k, v in (adapter or {}).items():
        by_module.setdefault(k.rsplit(".", 1)[0] + ".weight", {})[k] = v
    sd: dict[str, Tensor] = {}
    quantized: set[str] = set()
    for key, t, f in iter_checkpoint(base):
        try:
            ours = hf_to_ours(key)
        except KeyError:
            raise ValueError(f"{f}: unexpected key {key!r}") from None
        if ours is None:
            continue
        if tuple(t.shape) != expected[ours]:
            raise ValueError(f"{f}: {key} has shape {tuple(t.shape)}, expected {expected[ours]} from {base / 'config.json'}")
        if ours in by_module:
            t = merge_lora({ours: t}, by_module.pop(ours), scale)[ours]
        if quantize and ours.split(".")[-2] in QUANTIZED:
            llm.set_submodule(ours.removesuffix(".weight"), QuantLinear.from_float(t, quantize, dtype, device, trainable_input=trainable_input))
            quantized.add(ours)
        else:  # quantizing: copied, so that no tensor pins the memory-mapped file once it is read
            sd[ours] = t.to(device=device, dtype=dtype, copy=bool(quantize))
    missing = [ours_to_hf(k) for k in expected if k not in sd and k not in quantized]
    if missing:
        raise ValueError(f"{base}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    if by_module:
        raise ValueError(f"adapter: LoRA for {sorted(by_module)[0]!r} has no base weight")
    llm.load_state_dict(sd, assign=True, strict=not quantize)  # the quantized layers are in place already
    return llm.eval()


def load_projector(path: Path, mm_hidden: int, dim: int) -> Projector:
    """`non_lora_trainables.bin` (release) or `mm_projector.bin` (pretrain output)."""
    proj = Projector(mm_hidden, dim)
    expected = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    sd = {}
    for key, t in load_file(path).items():
        short = key
        for p in PROJECTOR_PREFIXES:
            short = short.removeprefix(p)
        if short not in expected:
            raise ValueError(f"{path}: unexpected key {key!r}")
        if tuple(t.shape) != expected[short]:
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, expected {expected[short]}")
        sd[short] = t
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"{path}: missing projector tensor 'model.mm_projector.{missing[0]}'")
    proj.load_state_dict(sd)
    return proj


def release_file(folder: Path, stored: str, default: str) -> Path:
    """A file named in config.json (maybe a path on the training machine), found in the release folder."""
    for name in (Path(stored).name, default):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: missing {Path(stored).name or default}")


def load_llavarad(release: str, base: str, dtype: torch.dtype, device: str | torch.device,
                  quantize: str | None = None) -> tuple[LlavaRad, Tokenizer]:
    """The released model: release folder + base folder (local paths or hub ids) -> model, tokenizer.
    `quantize` ("int8" | "int4"): the decoder's linear layers quantized while loading."""
    release, base_dir = resolve_folder(release, "model"), resolve_folder(base, "base model")
    mm = MultimodalConfig.from_hf(release / "config.json")
    adapter, scale = load_adapter(release) if (release / "adapter_config.json").is_file() else (None, 1.0)
    llm = load_llm(base_dir, dtype, device, adapter=adapter, scale=scale, quantize=quantize)
    projector = load_projector(release_file(release, "non_lora_trainables.bin", "mm_projector.bin"), mm.mm_hidden_size, llm.cfg.dim)
    tower = load_tower(
        str(release_file(release, mm.mm_vision_tower_config, TOWER_JSON)),
        str(release_file(release, mm.mm_vision_tower_checkpoint, TOWER_CKPT)),
        mm.mm_vision_select_layer,
    )
    if tower.cfg.width != mm.mm_hidden_size:
        raise ValueError(f"{release / 'config.json'}: mm_hidden_size {mm.mm_hidden_size} but the tower width is {tower.cfg.width}")
    tokenizer = Tokenizer(str(base_dir / "tokenizer.model"))
    model = LlavaRad(tower, projector, llm).to(device=device, dtype=dtype)
    return model.eval(), tokenizer
