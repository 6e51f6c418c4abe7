"""The training run's settings: one flat dataclass, a TOML file that overrides its fields, and a
command line that overrides both (every field is a flag: `global_batch` -> `--global-batch`)."""

import argparse
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

STAGES = ("pretrain", "lora")
PARSERS = {int: int, float: float, str: str, str | None: str}  # field type -> command-line parser
CHECKPOINTING = ("full", "selective", "none")


@dataclass
class TrainConfig:
    stage: str  # "pretrain" (projector only, template "plain") or "lora" (projector + LoRA, template "v1")
    data: str  # the annotation JSON (PhysioNet LLaVA-Rad MIMIC-CXR) or a JSON list in the same format
    image_folder: str  # image paths in the records are relative to it
    base: str  # the base Llama folder (lmsys/vicuna-7b-v1.5), with tokenizer.model
    tower: str  # folder holding biomedclipcxr_518.json + biomedclipcxr_518_checkpoint.pt
    output: str  # run folder: outputs, checkpoints/, metrics.jsonl
    projector: str | None = None  # lora stage: the pretrain stage's mm_projector.bin
    loader: str = "mimic_train_findings"
    val_data: str | None = None  # held-out file for a validation loss (same loader)
    val_every: int = 0  # steps between validations (0: only at the end; nothing without val_data)
    # optimisation (docs/training-recipe.md)
    lr: float = 1e-3
    epochs: int = 1
    max_steps: int = 0  # > 0: train this many steps instead of `epochs` (the schedule spans them)
    global_batch: int = 256  # samples per optimizer step, over all ranks and micro-batches
    micro_batch: int = 8  # samples per forward pass on one rank
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_len: int = 2048  # tokens, image patches included; longer samples are cut (and reported)
    # LoRA (lora stage)
    lora_r: int = 64
    lora_alpha: float = 128.0
    lora_dropout: float = 0.05
    # compute
    dtype: str = "bfloat16"  # "bfloat16": frozen weights bf16, trainable fp32, bf16 autocast; "float32": all fp32
    activation_checkpointing: str = "full"  # per decoder block: "full", "selective" (keeps matmul outputs), "none"
    num_workers: int = 4  # DataLoader worker processes per rank (image decoding + preprocessing)
    seed: int = 0
    max_missing_frac: float = 0.001  # fail when more than this fraction of the dataset's images is unreadable
    # logging and checkpoints
    log_every: int = 10
    save_every: int = 1000  # steps between checkpoints (0 = only the final outputs)
    keep_checkpoints: int = 1  # older checkpoints are deleted once a newer one is complete
    resume: bool = False  # continue from the newest checkpoint in output/checkpoints
    peak_tflops: float = 989.0  # the device's dense bf16 peak, for the MFU figure (H100 SXM: 989)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r}: choose from {', '.join(STAGES)}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing {self.activation_checkpointing!r}: choose from {', '.join(CHECKPOINTING)}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype {self.dtype!r}: choose bfloat16 or float32")
        if self.stage == "lora" and not self.projector:
            raise ValueError("the lora stage needs --projector (the pretrain stage's mm_projector.bin)")
        for name in ("global_batch", "micro_batch", "epochs", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < `--config FILE.toml` < command-line flags."""
    p = argparse.ArgumentParser(
        description="Train LLaVA-Rad (stage pretrain or lora); run under torchrun for several GPUs.",
        epilog="Each flag sets the TrainConfig field of the same name (llavarad/train_config.py explains them all).",
    )
    p.add_argument("--config", help="TOML file whose keys are the fields below (configs/pretrain.toml, configs/lora.toml)")
    for f in fields(TrainConfig):
        if f.type is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=PARSERS[f.type], default=None, metavar=f.name.upper())
    args = vars(p.parse_args(argv))
    values = read_toml(Path(args.pop("config"))) if args.get("config") else {}
    values.update({k: v for k, v in args.items() if v is not None})
    missing = [f.name for f in fields(TrainConfig) if f.default is MISSING and f.name not in values]
    if missing:
        raise ValueError("missing " + ", ".join(_flag(m) for m in missing) + " (on the command line or in --config)")
    return TrainConfig(**values)


def read_toml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: malformed TOML ({e})") from None
    types = {f.name: f.type for f in fields(TrainConfig)}
    for key, value in values.items():
        if key not in types:
            raise ValueError(f"{path}: unknown setting {key!r}")
        expected = {float: (int, float), str | None: str}.get(types[key], types[key])
        if not isinstance(value, expected) or (isinstance(value, bool) and types[key] is not bool):
            raise ValueError(f"{path}: {key} = {value!r} should be of type {types[key]}")
    return values
