"""Checkpoint loading: the base Llama folder, the LLaVA-Rad release folder (LoRA adapter merged at
load, projector), the open_clip vision tower, with the key mapping written out as a table.

Every unknown, missing or wrongly shaped tensor is an error naming the key, the file and the shapes.
"""

import json
import math
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from llavarad.errors import first_line
from llavarad.hub import download_command, hub_download
from llavarad.jsonl import read_text
from llavarad.model.config import TOWER_CKPT, TOWER_JSON, LlamaConfig, MultimodalConfig, read_json
from llavarad.model.llama import Llama
from llavarad.model.llava import LlavaRad, Projector
from llavarad.model.lora import merge_lora
from llavarad.model.quant import QUANTIZED, QuantLinear
from llavarad.model.tokenizer import Tokenizer
from llavarad.model.vision import Block, VisionConfig, VisionTower

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
            f"{name}: no such {what} folder; download it ({download_command(name)}) "
            f"and pass DIR, or pip install 'llavarad[hub]' to download it here"
        ) from None
    except ConnectionError as e:
        raise FileNotFoundError(f"{name}: no such {what} folder, and the hub download failed ({e}); download it where "
                                f"there is a network ({download_command(name)}) and pass DIR") from None


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


def merged_decoder(base: Path, expected: dict[str, tuple[int, ...]], adapter: dict[str, Tensor] | None = None,
                   scale: float = 1.0) -> Iterator[tuple[str, Tensor]]:
    """(our key, tensor) for every decoder tensor of the base checkpoint, one at a time, shapes checked
    against `expected` ({our key: shape}), a LoRA `adapter` (from `load_adapter`) merged at `scale`
    (in float32). A missing tensor, or an adapter module without a base weight, is an error at the end."""
    by_module: dict[str, dict[str, Tensor]] = {}
    for k, v in (adapter or {}).items():
        by_module.setdefault(k.rsplit(".", 1)[0] + ".weight", {})[k] = v
    seen: set[str] = set()
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
        seen.add(ours)
        yield ours, t
    missing = [ours_to_hf(k) for k in expected if k not in seen]
    if missing:
        raise ValueError(f"{base}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    if by_module:
        raise ValueError(f"adapter: LoRA for {sorted(by_module)[0]!r} has no base weight")


def load_llm(base: Path, dtype: torch.dtype, device: str | torch.device, adapter: dict[str, Tensor] | None = None,
             scale: float = 1.0, quantize: str | None = None, trainable_input: bool = False) -> Llama:
    """Build the decoder on the meta device and assign the base weights tensor by tensor, so a 7B
    model never exists twice in memory. A LoRA `adapter` (from `load_adapter`) is merged at `scale`.
    `quantize` ("int8" | "int4"): each linear layer of the blocks is quantized as it is read (see
    llavarad.model.quant; `trainable_input`: for QLoRA), so memory stays near the quantized size; `dtype`
    is that of the activations and of the weights left unquantized."""
    cfg = LlamaConfig.from_hf(base / "config.json")
    with torch.device("meta"):
        llm = Llama(cfg)
    expected = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    sd: dict[str, Tensor] = {}
    for ours, t in merged_decoder(base, expected, adapter, scale):
        if quantize and ours.split(".")[-2] in QUANTIZED:
            llm.set_submodule(ours.removesuffix(".weight"), QuantLinear.from_float(t, quantize, dtype, device, trainable_input=trainable_input))
        else:  # quantizing: copied, so that no tensor pins the memory-mapped file once it is read
            sd[ours] = t.to(device=device, dtype=dtype, copy=bool(quantize))
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


TRUNK_PREFIX = "visual.trunk."
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\..+")


def _trunk_state_dict(checkpoint: object, path: str) -> dict[str, Tensor]:
    """The timm trunk tensors of an open_clip checkpoint, keyed by timm name.

    Accepts an open_clip training checkpoint {"state_dict": {"module.visual.trunk.<k>": ...}, ...}
    (the release), the same without "module." (not trained with DDP), or the bare state dict.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        kind = type(checkpoint).__name__
        raise ValueError(f"{path}: expected an open_clip checkpoint (a dict of tensors), got a {kind}")
    trunk = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name.startswith(TRUNK_PREFIX):
            if not isinstance(value, Tensor):
                raise ValueError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
            trunk[name.removeprefix(TRUNK_PREFIX)] = value
    if not trunk:
        raise ValueError(f"{path}: no {TRUNK_PREFIX}* tensors (is this an open_clip checkpoint of BiomedCLIP-CXR?)")
    return trunk


def _require(trunk: dict[str, Tensor], name: str, ndim: int, path: str) -> Tensor:
    if name not in trunk:
        raise ValueError(f"{path}: missing tensor {TRUNK_PREFIX}{name}")
    if trunk[name].ndim != ndim:
        raise ValueError(f"{path}: {TRUNK_PREFIX}{name} has shape {tuple(trunk[name].shape)}, expected {ndim} dims")
    return trunk[name]


def _config_from_tensors(
    trunk: dict[str, Tensor], head_width: int, image_size: int, names: tuple[str, str]
) -> VisionConfig:
    """Reads the architecture off the tensor shapes; the json only supplies head width and image size."""
    json_path, ckpt_path = names
    width, _, patch, _ = _require(trunk, "patch_embed.proj.weight", 4, ckpt_path).shape
    n_pos = _require(trunk, "pos_embed", 3, ckpt_path).shape[1]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"{ckpt_path}: pos_embed has {n_pos} positions, not 1 CLS + a square grid of patches")
    if grid * patch != image_size:
        raise ValueError(
            f"{json_path}: image_size {image_size} does not match {ckpt_path}, whose pos_embed covers a "
            f"{grid}x{grid} grid of {patch}-px patches ({grid * patch} px)"
        )
    if head_width <= 0 or width % head_width:
        raise ValueError(f"{json_path}: head_width {head_width} does not divide the tower width {width}")
    indices = {int(m.group(1)) for m in map(_BLOCK_KEY.fullmatch, trunk) if m}
    if not indices:
        raise ValueError(f"{ckpt_path}: no {TRUNK_PREFIX}blocks.* tensors")
    mlp_hidden = _require(trunk, "blocks.0.mlp.fc1.weight", 2, ckpt_path).shape[0]
    return VisionConfig(
        image_size=image_size, patch_size=patch, width=width, depth=max(indices) + 1,
        heads=width // head_width, mlp_hidden=mlp_hidden,
    )


def load_tower(json_path: str, checkpoint_path: str, select_layer: int = -2) -> VisionTower:
    """Builds the tower from the open_clip model json and checkpoint of the release, frozen, in eval mode.

    The architecture comes from the tensors (patch size and width from patch_embed, depth from the
    block indices, image size from pos_embed, cross-checked with the json's image_size, MLP width from
    fc1); heads = width // vision_cfg.head_width (open_clip's default 64). Blocks after the selected
    one and the final norm are skipped. Parameters keep the checkpoint's dtype.
    """
    for path in (json_path, checkpoint_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    try:
        model_cfg = json.loads(read_text(json_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not a valid open_clip model json ({e})") from None
    vision_cfg = model_cfg.get("vision_cfg") if isinstance(model_cfg, dict) else None
    if not isinstance(vision_cfg, dict) or "image_size" not in vision_cfg:
        raise ValueError(f"{json_path}: no vision_cfg.image_size (is this an open_clip model json?)")
    image_size = vision_cfg["image_size"]
    if isinstance(image_size, list) and len(image_size) == 2 and image_size[0] == image_size[1]:
        image_size = image_size[0]  # open_clip also accepts [h, w]
    head_width = vision_cfg.get("head_width", 64)  # open_clip's default; the release leaves it out
    if not isinstance(image_size, int) or not isinstance(head_width, int):
        raise ValueError(
            f"{json_path}: vision_cfg.image_size and head_width must be integers, got {image_size!r}, {head_width!r}"
        )
    model_name = vision_cfg.get("timm_model_name", "an unnamed timm model")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types, all meaning "not a loadable checkpoint"
        raise ValueError(f"{checkpoint_path}: cannot load checkpoint ({first_line(e)})") from None
    trunk = _trunk_state_dict(checkpoint, checkpoint_path)
    del checkpoint  # the text tower and optimizer state are not needed
    cfg = _config_from_tensors(trunk, head_width, image_size, (json_path, checkpoint_path))

    with torch.device("meta"):  # no memory, no random init: every tensor comes from the checkpoint
        tower = VisionTower(cfg, select_layer)
        block_params = set(Block(cfg).state_dict())
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    unused = {"norm.weight", "norm.bias"}  # the final norm, never applied by LLaVA-Rad
    unused |= {f"blocks.{i}.{p}" for i in range(len(tower.blocks), cfg.depth) for p in block_params}
    for name, shape in expected.items():
        if name not in trunk:
            raise ValueError(f"{checkpoint_path}: missing tensor {TRUNK_PREFIX}{name} (expected shape {shape})")
        if tuple(trunk[name].shape) != shape:
            raise ValueError(
                f"{checkpoint_path}: {TRUNK_PREFIX}{name} has shape {tuple(trunk[name].shape)}, expected {shape} "
                f"for {model_name} as configured by {json_path}"
            )
    for name in trunk:
        if name not in expected and name not in unused:
            raise ValueError(
                f"{checkpoint_path}: unknown tensor {TRUNK_PREFIX}{name} {tuple(trunk[name].shape)} "
                f"(not part of {model_name} in timm's dinov2 layout)"
            )
    tower.load_state_dict({k: trunk[k] for k in expected}, strict=True, assign=True)
    return tower.eval().requires_grad_(False)


def locate_tower(release: Path | None = None, mm: MultimodalConfig | None = None, tower_dir: str | None = None) -> tuple[Path, Path]:
    """The tower's open_clip json and checkpoint, each looked for in this order:
      1. in the release folder, under the file name config.json gives, then the standard name;
      2. at the path config.json gives, as written (the official training code stores absolute paths
         of the training machine and copies no tower file into its output), when it exists here;
      3. in the `tower_dir` folder (--tower), under the same names.
    The error names every place tried."""
    stored = (mm.mm_vision_tower_config, mm.mm_vision_tower_checkpoint) if mm else (TOWER_JSON, TOWER_CKPT)
    found = []
    for path, name in zip(stored, (TOWER_JSON, TOWER_CKPT)):
        names = list(dict.fromkeys([Path(path).name, name]))  # in order, once each
        tried = [release / n for n in names] if release else []
        if mm:
            tried.append(Path(path) if Path(path).is_absolute() or not release else release / path)
        tried += [Path(tower_dir) / n for n in names] if tower_dir else []
        tried = list(dict.fromkeys(tried))
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"{name}: tower file not found; tried {', '.join(map(str, tried))} "
                                    f"(--tower DIR names a folder with {TOWER_JSON} and {TOWER_CKPT})")
        found.append(hit)
    return found[0], found[1]


def release_file(folder: Path, stored: str, default: str) -> Path:
    """A file named in config.json (maybe a path on the training machine), found in the release folder."""
    for name in (Path(stored).name, default):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: missing {Path(stored).name or default}")


def load_llavarad(release: str, base: str, dtype: torch.dtype, device: str | torch.device,
                  tower_dir: str | None = None, quantize: str | None = None) -> tuple[LlavaRad, Tokenizer]:
    """The released model: release folder + base folder (local paths or hub ids) -> model, tokenizer.
    `tower_dir`: a folder with the tower files, for a release folder that has none (see locate_tower).
    `quantize` ("int8" | "int4"): the decoder's linear layers quantized while loading."""
    release, base_dir = resolve_folder(release, "model"), resolve_folder(base, "base model")
    mm = MultimodalConfig.from_hf(release / "config.json")
    tower_json, tower_ckpt = locate_tower(release, mm, tower_dir)  # before the 7B decoder: a missing file fails fast
    adapter, scale = load_adapter(release) if (release / "adapter_config.json").is_file() else (None, 1.0)
    llm = load_llm(base_dir, dtype, device, adapter=adapter, scale=scale, quantize=quantize)
    projector = load_projector(release_file(release, "non_lora_trainables.bin", "mm_projector.bin"), mm.mm_hidden_size, llm.cfg.dim)
    tower = load_tower(str(tower_json), str(tower_ckpt), mm.mm_vision_select_layer)
    if tower.cfg.width != mm.mm_hidden_size:
        raise ValueError(f"{release / 'config.json'}: mm_hidden_size {mm.mm_hidden_size} but the tower width is {tower.cfg.width}")
    tokenizer = Tokenizer(str(base_dir / "tokenizer.model"))
    model = LlavaRad(tower, projector, llm).to(device=device, dtype=dtype)
    return model.eval(), tokenizer
