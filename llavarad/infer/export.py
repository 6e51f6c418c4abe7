"""One self-contained folder for inference: the decoder with the LoRA adapter merged (quantized and
packed when asked), the tower, the projector, the tokenizer and the configs, written once and then
loaded by memory-mapping, with no merge and no quantization at start.

    DIR/manifest.json            format, version, dtype, quantization, the sources, every file's size
    DIR/config.json              the base's Llama fields + the release's LLaVA fields
    DIR/decoder-0000N.safetensors  our key names; a quantized layer is "<module>.weight" (int8 (N, K), or
                                 int4 tiles64 (N, K/2): quant.tile_int4) + "<module>.scales"
    DIR/tower.json, tower.safetensors   VisionConfig + select_layer; the blocks the tower runs
    DIR/projector.safetensors    mlp2x_gelu
    DIR/tokenizer.model          the base's SentencePiece model

safetensors only. Written in a hidden sibling folder, the manifest last, then renamed into place:
a killed export leaves no folder that loads. A damaged export (missing or truncated file, wrong
shapes) is one error naming the file.
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save, save_file
from torch import Tensor

from llavarad.errors import first_line
from llavarad.model.config import DTYPES, LlamaConfig, MultimodalConfig, read_json
from llavarad.model.llama import Llama
from llavarad.model.llava import LlavaRad, Projector
from llavarad.model.quant import MODES, QUANTIZED, QuantLinear, int4_group, quantize_int4, quantize_int8, tile_int4
from llavarad.model.tokenizer import Tokenizer
from llavarad.model.vision import VisionConfig, VisionTower
from llavarad.model.weights import (load_adapter, load_file, load_projector, load_tower, locate_tower, merged_decoder,
                                    release_file, resolve_folder)

FORMAT, VERSION, MANIFEST = "llavarad-export", 1, "manifest.json"
SHARD_BYTES = 2 * 10**9
ALIGN = 64  # bytes: torch's int8 kernel reads a weight that is not 16-byte aligned wrongly (it crashes)


def is_export(name: str | Path) -> bool:
    return (Path(name).expanduser() / MANIFEST).is_file()


def export(release: str, base: str, output: str | Path, dtype: torch.dtype, quantize: str | None = None,
           tower_dir: str | None = None) -> Path:
    """Write the export of release + base (local folders or hub ids) to `output`; returns it. `output`
    must be absent, empty, or an earlier export (replaced whole, at the end)."""
    if quantize not in (None, *MODES):
        raise ValueError(f"quantize {quantize!r}: choose from {', '.join(MODES)}")
    out = Path(output).expanduser().absolute()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_export(out))):
        raise FileExistsError(f"{out}: exists and is not empty nor an earlier export; refusing to write into it")
    release_dir, base_dir = resolve_folder(release, "model"), resolve_folder(base, "base model")
    mm = MultimodalConfig.from_hf(release_dir / "config.json")
    tower_json, tower_ckpt = locate_tower(release_dir, mm, tower_dir)
    adapter, scale = load_adapter(release_dir) if (release_dir / "adapter_config.json").is_file() else (None, 1.0)
    partial = out.parent / f".{out.name}.partial"  # ours by name: a killed run's leftovers go here
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    try:  # a failure leaves nothing behind; a kill leaves the partial folder, which has no manifest
        decoder = write_decoder(partial, base_dir, dtype, quantize, adapter, scale)
        llm_cfg = read_json(base_dir / "config.json")
        (partial / "config.json").write_text(json.dumps(llm_cfg | asdict(mm) | {"mm_vision_tower_config": "tower.json",
                                                                                "mm_vision_tower_checkpoint": "tower.safetensors"}, indent=1))
        tower = load_tower(str(tower_json), str(tower_ckpt), mm.mm_vision_select_layer)
        save_file(_cast(tower.state_dict(), dtype), partial / "tower.safetensors")
        (partial / "tower.json").write_text(json.dumps(asdict(tower.cfg) | {"select_layer": mm.mm_vision_select_layer}, indent=1))
        projector = load_projector(release_file(release_dir, "non_lora_trainables.bin", "mm_projector.bin"),
                                   mm.mm_hidden_size, llm_cfg["hidden_size"])
        save_file(_cast(projector.state_dict(), dtype), partial / "projector.safetensors")
        shutil.copyfile(base_dir / "tokenizer.model", partial / "tokenizer.model")
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": str(dtype).removeprefix("torch."), "quantize": quantize,
            "int4_layout": "tiles64" if quantize == "int4" else None, "decoder": decoder,
            "sources": {"model": _identity(release_dir), "base": _identity(base_dir)},
            "files": {f.name: f.stat().st_size for f in sorted(partial.iterdir())},
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _replace(partial, out)
    return out


def write_decoder(folder: Path, base: Path, dtype: torch.dtype, quantize: str | None,
                  adapter: dict[str, Tensor] | None, scale: float) -> list[str]:
    """The merged (and quantized) decoder as safetensors shards of about SHARD_BYTES; their names."""
    with torch.device("meta"):
        llm = Llama(LlamaConfig.from_hf(base / "config.json"))
    expected = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    names, shard, size = [], {}, 0
    for key, t in merged_decoder(base, expected, adapter, scale):
        if quantize and key.split(".")[-2] in QUANTIZED:
            w, s = _quantized(t, quantize, dtype)
            shard |= {key: w, key.removesuffix("weight") + "scales": s}
            size += w.nbytes + s.nbytes
        else:
            shard[key] = t.to(dtype=dtype, copy=True)  # copied: nothing pins the base's memory-mapped file
            size += shard[key].nbytes
        if size >= SHARD_BYTES:
            names.append(_save_shard(folder, shard, len(names) + 1))
            shard, size = {}, 0
    if shard:
        names.append(_save_shard(folder, shard, len(names) + 1))
    return names


def _quantized(w: Tensor, mode: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A float weight (N, K) -> its stored (weight, scales), by the code --quantize runs at load."""
    if mode == "int8":
        return quantize_int8(w, dtype)
    q, sz = quantize_int4(w, int4_group(w.shape[1]), dtype)
    return tile_int4(q), sz


def _save_shard(folder: Path, shard: dict[str, Tensor], n: int) -> str:
    name = f"decoder-{n:05d}.safetensors"
    _save_aligned(shard, folder / name)
    return name


def _save_aligned(tensors: dict[str, Tensor], path: Path) -> None:
    """save_file, with the data starting at a multiple of ALIGN bytes in the file (a metadata string
    pads the header): then every tensor whose predecessors' sizes are multiples of ALIGN (all of them
    at the 7B shape) is aligned when memory-mapped, as the int8 kernel needs, and loads without a copy."""
    pad = 0
    for _ in range(2):
        data = save(tensors, metadata={"pad": " " * pad})
        header = int.from_bytes(data[:8], "little")  # safetensors pads the JSON with spaces to a multiple of 8
        if (8 + header) % ALIGN == 0:
            path.write_bytes(data)
            return
        raw = len(data[8 : 8 + header].rstrip(b" "))
        pad += next(k for k in range(ALIGN) if (8 + -(-(raw + k) // 8) * 8) % ALIGN == 0)
    raise AssertionError(f"{path}: could not align the data to {ALIGN} bytes")


def _cast(sd: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _identity(folder: Path) -> dict:
    """Where a source folder was and the size of each of its files: enough to tell two sources apart."""
    return {"path": str(folder.absolute()), "files": {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}}


def _replace(partial: Path, out: Path) -> None:
    """Move the finished folder into place; an earlier export (or an empty folder) there goes after."""
    for f in partial.iterdir():  # on disk before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def load_export(folder: str | Path, device: str | torch.device, dtype: torch.dtype | None = None,
                quantize: str | None = None) -> tuple[LlavaRad, Tokenizer]:
    """An export -> model, tokenizer, by memory-mapping its files: the tensors stay the pages of the
    files on a CPU in the export's dtype (another `dtype` or device copies the float tensors; int4 on a
    CPU whose kernel does not read tiles64, or on a GPU, is repacked). `quantize`, when given, must
    be the export's own: quantizing happens when exporting."""
    folder = Path(folder).expanduser()
    manifest = _checked_manifest(folder)
    dtype = dtype or DTYPES[manifest["dtype"]]
    if quantize not in (None, manifest["quantize"]):
        raise ValueError(f"{folder}: the export is {manifest['quantize'] or 'not quantized'}; --quantize {quantize} "
                         f"asks for another (export again with --quantize {quantize})")
    quantize = manifest["quantize"]
    with torch.device("meta"):
        llm = Llama(LlamaConfig.from_hf(folder / "config.json"))
    expected = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    sd: dict[str, Tensor] = {}
    for name in manifest["decoder"]:
        path = folder / name
        tensors = load_file(path)
        for key, t in tensors.items():
            module, leaf = key.rsplit(".", 1)
            if quantize and module.split(".")[-1] in QUANTIZED:
                if leaf == "scales":
                    continue
                N, K = expected.get(key, (None, None))
                scales = tensors.get(module + ".scales")
                if N is None or scales is None or not _stored_shapes_ok(quantize, t, scales, N, K):
                    got = (tuple(t.shape), None if scales is None else tuple(scales.shape))
                    raise ValueError(f"{path}: {key} (+ scales) has shapes {got}, not {quantize} of a {(N, K)} weight")
                llm.set_submodule(module, QuantLinear.from_stored(t, scales, quantize, device, dtype))
                expected.pop(key)
                continue
            if key not in expected:
                raise ValueError(f"{path}: unexpected tensor {key!r}")
            if tuple(t.shape) != expected[key]:
                raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, expected {expected[key]} from {folder / 'config.json'}")
            sd[key] = t.to(device=device, dtype=dtype)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"{folder}: the decoder files miss {len(missing)} tensors, e.g. {missing[0]!r}")
    llm.load_state_dict(sd, assign=True, strict=False)  # the quantized layers are in place already
    mm = MultimodalConfig.from_hf(folder / "config.json")
    tower_cfg = read_json(folder / "tower.json")
    try:
        select_layer = tower_cfg.pop("select_layer")
        cfg = VisionConfig(**tower_cfg)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'tower.json'}: not a tower config ({first_line(e)})") from None
    with torch.device("meta"):
        tower = VisionTower(cfg, select_layer)
        projector = Projector(mm.mm_hidden_size, llm.cfg.dim)
    for module, name in ((tower, "tower.safetensors"), (projector, "projector.safetensors")):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = load_file(folder / name)
        for k, shape in want.items():
            if k not in got or tuple(got[k].shape) != shape:
                found = tuple(got[k].shape) if k in got else "missing"
                raise ValueError(f"{folder / name}: {k} is {found}, expected {shape}")
        if extra := sorted(set(got) - set(want)):
            raise ValueError(f"{folder / name}: unexpected tensor {extra[0]!r}")
        module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in got.items()}, assign=True)
    tokenizer = Tokenizer(str(folder / "tokenizer.model"))
    return LlavaRad(tower.eval().requires_grad_(False), projector.eval(), llm.eval()).eval(), tokenizer


def _checked_manifest(folder: Path) -> dict:
    """The manifest, after checking that every file it lists is there with its size."""
    manifest = read_json(folder / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{folder / MANIFEST}: not a {FORMAT} version {VERSION} manifest")
    try:
        if manifest["quantize"] not in (None, *MODES) or manifest["dtype"] not in DTYPES:
            raise ValueError(f"{folder / MANIFEST}: unknown quantize {manifest['quantize']!r} or dtype {manifest['dtype']!r}")
        files, decoder = dict(manifest["files"]), list(manifest["decoder"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder / MANIFEST}: malformed ({first_line(e)})") from None
    for name in ("config.json", "tower.json", "tower.safetensors", "projector.safetensors", "tokenizer.model", *decoder):
        if name not in files:
            raise ValueError(f"{folder / MANIFEST}: lists no {name}")
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the export (export again)")
        if path.stat().st_size != size:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, the manifest says {size} (truncated or changed; export again)")
    return manifest


def _stored_shapes_ok(mode: str, w: Tensor, scales: Tensor, N: int, K: int) -> bool:
    if mode == "int8":
        return w.dtype == torch.int8 and tuple(w.shape) == (N, K) and tuple(scales.shape) == (N,)
    G = scales.shape[0] if scales.ndim == 3 else 0
    return (w.dtype == torch.uint8 and tuple(w.shape) == (N, K // 2) and G > 0 and K % G == 0
            and tuple(scales.shape) == (G, N, 2))
