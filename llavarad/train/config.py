"""The training run's settings: one flat dataclass, a TOML file that overrides its fields, and a
command line that overrides both (every field is a flag: `global_batch` -> `--global-batch`).

Each field carries its documentation, its allowed values and whether `--resume` may change it
(`setting`), so that `train.py --help`, the validation and the resume check read one table.
"""

import argparse
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from llavarad.infer.records import LOADERS
from llavarad.model.quant import MODES

STAGES = ("pretrain", "lora")
PARSERS = {int: int, float: float, str: str, str | None: str}  # field type -> command-line parser


def setting(doc: str, default=MISSING, choices: tuple[str, ...] = (), resume: bool = False):
    """A TrainConfig field: `doc` for --help, the `choices` it accepts, and `resume`: True when a
    resumed run may change it (it does not change the trained weights, or it is the run's length)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "resume": resume})


@dataclass
class TrainConfig:
    stage: str = setting('"pretrain": the projector trains, template "plain"; "lora": projector + LoRA, template "v1"',
                         choices=STAGES)
    data: str = setting("the annotation JSON (PhysioNet LLaVA-Rad MIMIC-CXR), a JSON list in its format, or a JSONL")
    image_folder: str = setting("the records' image paths are relative to it")
    base: str = setting("the base Llama folder (lmsys/vicuna-7b-v1.5) with tokenizer.model, or a hub repo id")
    tower: str = setting("the folder holding biomedclipcxr_518.json and biomedclipcxr_518_checkpoint.pt")
    output: str = setting("the run folder: outputs, checkpoints/, metrics.jsonl, train_config.json")
    projector: str | None = setting("lora stage: the pretrain stage's mm_projector.bin (or a release's non_lora_trainables.bin)",
                                    None)
    loader: str = setting("which records train and how their question is built", "mimic_train_findings", LOADERS)
    val_data: str | None = setting("a held-out file for a validation loss (same loader)", None, resume=True)
    val_every: int = setting("steps between validations (0: only at the end; nothing without val_data)", 0, resume=True)
    # optimisation: the official recipe (docs/training-recipe.md)
    lr: float = setting("peak learning rate (projector and LoRA alike)", 1e-3)
    epochs: int = setting("passes over the data; the last global batch of an epoch may be partial", 1, resume=True)
    max_steps: int = setting("> 0: train this many optimizer steps instead of `epochs` (the schedule spans them)", 0,
                             resume=True)
    global_batch: int = setting("samples per optimizer step, over all ranks and micro-batches", 256)
    micro_batch: int = setting("samples per forward pass on one rank", 8)
    warmup_ratio: float = setting("share of the steps with a linear warmup, before the cosine decay", 0.03)
    weight_decay: float = setting("AdamW weight decay", 0.0)
    grad_clip: float = setting("clip the gradient's global norm to this; 0 = no clipping (the official runs had none)", 0.0)
    loss_norm: str = setting(
        '"global": the step\'s summed cross-entropy over its number of supervised tokens, whatever the micro-batch '
        'split; "micro": the official Trainer\'s, each micro-batch\'s mean over its own supervised tokens, averaged '
        "over the accumulation steps and ranks", "global", ("global", "micro"))
    max_len: int = setting(
        "the official model_max_length: a sample's token ids are cut to max_len with the image still ONE token, "
        "before it becomes the tower's N patch slots, so a sample reaches max_len - 1 + N positions "
        "(3416 at 2048 with 1369 patches); cut samples are counted", 2048)
    # LoRA (lora stage)
    lora_r: int = setting("LoRA rank", 64)
    lora_alpha: float = setting("LoRA alpha (the update is scaled by alpha / r)", 128.0)
    lora_dropout: float = setting("dropout on the LoRA branch's input", 0.05)
    # compute
    dtype: str = setting('"bfloat16": frozen weights bf16, trainable fp32, bf16 autocast; "float32": all fp32',
                         "bfloat16", ("bfloat16", "float32"))
    quantize_base: str | None = setting("the decoder's frozen linear layers in 8 or 4 bits (QLoRA; llavarad/model/quant.py)", None, MODES)
    activation_checkpointing: str = setting(
        'per decoder block: "full" recomputes the block, "selective" keeps its matmul outputs, "none" keeps all',
        "full", ("full", "selective", "none"), resume=True)
    num_workers: int = setting("DataLoader worker processes per rank (image decoding + preprocessing)", 4, resume=True)
    seed: int = setting("seeds the new weights, the data order and the LoRA dropout", 0)
    max_missing_frac: float = setting("fail when more than this fraction of the dataset's images is unreadable", 0.001,
                                      resume=True)
    # logging and checkpoints
    log_every: int = setting("steps between lines of metrics.jsonl", 10, resume=True)
    save_every: int = setting("steps between checkpoints (0: only the final outputs)", 1000, resume=True)
    keep_checkpoints: int = setting("older checkpoints are deleted once a newer one is complete", 1, resume=True)
    resume: bool = setting("continue from the newest checkpoint in output/checkpoints, with the same settings", False,
                           resume=True)
    peak_tflops: float = setting("the device's dense bf16 peak, for the MFU figure (H100 SXM: 989)", 989.0, resume=True)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["choices"] and value is not None and value not in f.metadata["choices"]:
                raise ValueError(f"{f.name} {value!r}: choose from {', '.join(f.metadata['choices'])}")
        if self.stage == "lora" and not self.projector:
            raise ValueError("the lora stage needs --projector (the pretrain stage's mm_projector.bin)")
        for name in ("global_batch", "micro_batch", "epochs", "max_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be 0 (no clipping) or positive, got {self.grad_clip}")

    def to_dict(self) -> dict:
        return asdict(self)


def resume_changes(saved: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """The settings a resumed run changes, as "name old -> new": (refused, allowed). Refused: every
    field that changes the trained weights; allowed: those marked `resume` (logging, validation,
    checkpointing, workers, the run's length)."""
    refused, allowed = [], []
    for f in fields(cfg):
        old, new = saved.get(f.name, f.default), getattr(cfg, f.name)
        if old != new:
            (allowed if f.metadata["resume"] else refused).append(f"{f.name} {old!r} -> {new!r}")
    return refused, allowed


def resume_safe_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig) if f.metadata["resume"]]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(f) -> str:
    default = "required" if f.default is MISSING else f"default: {f.default}"
    safe = "; may change on --resume" if f.metadata["resume"] and f.name != "resume" else ""
    return f"{f.metadata['doc']} ({default}{safe})".replace("%", "%%")  # argparse formats help with %


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < `--config FILE.toml` < command-line flags."""
    p = argparse.ArgumentParser(
        description="Train LLaVA-Rad (stage pretrain or lora); run under torchrun for several GPUs.",
        epilog="Each flag sets the TrainConfig field of the same name (llavarad/train/config.py); a --config file "
               "sets them too, and flags win.",
    )
    p.add_argument("--config", help="TOML file whose keys are the fields below (configs/pretrain.toml, configs/lora.toml)")
    for f in fields(TrainConfig):
        if f.type is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=_help(f))
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=PARSERS[f.type], default=None, help=_help(f),
                           choices=f.metadata["choices"] or None,
                           metavar=None if f.metadata["choices"] else f.name.upper())  # choices show as {a,b}
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
