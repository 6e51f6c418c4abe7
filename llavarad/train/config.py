"""The training run's settings: one flat dataclass, a TOML file that overrides its fields, and a
command line that overrides both (every field is a flag: `global_batch` -> `--global-batch`).

Each field carries its documentation, its allowed values (choices, or the bounds of a number) and
whether `--resume` may change it (`setting`), so that `train.py --help`, the validation of flags,
config files and the dataclass itself, and the resume check read one table.
"""

import argparse
import math
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path

from llavarad.infer.records import LOADERS
from llavarad.jsonl import read_text
from llavarad.model.quant import MODES

STAGES = ("pretrain", "lora")
PARSERS = {int: int, float: float, str: str, str | None: str}  # field type -> command-line parser


@dataclass(frozen=True)
class Bounds:
    """The numbers a numeric setting accepts: from low to high (None: no limit), an end excluded when
    it is open. A float must also be finite: nan passes no comparison, and inf is no setting."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        return ((isinstance(value, int) or math.isfinite(value))
                and (self.low is None or value > self.low or (value == self.low and not self.low_open))
                and (self.high is None or value < self.high or (value == self.high and not self.high_open)))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_1 = Bounds(0, low_open=True), Bounds(0), Bounds(1)
FRACTION, DROPOUT = Bounds(0, 1), Bounds(0, 1, high_open=True)


def setting(doc: str, default=MISSING, choices: tuple[str, ...] = (), resume: bool = False, bounds: Bounds | None = None):
    """A TrainConfig field: `doc` for --help, the `choices` it accepts or, for a number, its `bounds`,
    and `resume`: True when a resumed run may change it (it does not change the trained weights, or
    it is the run's length)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "resume": resume, "bounds": bounds})


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
    val_every: int = setting("steps between validations (0: only at the end; nothing without val_data)", 0, resume=True,
                             bounds=NON_NEGATIVE)
    # optimisation: the official recipe (docs/training-recipe.md)
    lr: float = setting("peak learning rate (projector and LoRA alike)", 1e-3, bounds=POSITIVE)
    epochs: int = setting("passes over the data; the last global batch of an epoch may be partial", 1, resume=True,
                          bounds=AT_LEAST_1)
    max_steps: int = setting("> 0: train this many optimizer steps instead of `epochs` (the schedule spans them); "
                             "0: `epochs` decide", 0, resume=True, bounds=NON_NEGATIVE)
    global_batch: int = setting("samples per optimizer step, over all ranks and micro-batches", 256, bounds=AT_LEAST_1)
    micro_batch: int = setting("samples per forward pass on one rank", 8, bounds=AT_LEAST_1)
    warmup_ratio: float = setting("share of the steps with a linear warmup, before the cosine decay", 0.03, bounds=FRACTION)
    weight_decay: float = setting("AdamW weight decay", 0.0, bounds=NON_NEGATIVE)
    grad_clip: float = setting("clip the gradient's global norm to this; 0 = no clipping (the official runs had none)", 0.0,
                               bounds=NON_NEGATIVE)
    loss_norm: str = setting(
        '"global": the step\'s summed cross-entropy over its number of supervised tokens, whatever the micro-batch '
        'split; "micro": the official Trainer\'s, each micro-batch\'s mean over its own supervised tokens, averaged '
        "over the accumulation steps and ranks", "global", ("global", "micro"))
    max_len: int = setting(
        "the official model_max_length: a sample's token ids are cut to max_len with the image still ONE token, "
        "before it becomes the tower's N patch slots, so a sample reaches max_len - 1 + N positions "
        "(3416 at 2048 with 1369 patches); cut samples are counted", 2048, bounds=AT_LEAST_1)
    # LoRA (lora stage)
    lora_r: int = setting("LoRA rank", 64, bounds=AT_LEAST_1)
    lora_alpha: float = setting("LoRA alpha (the update is scaled by alpha / r)", 128.0, bounds=POSITIVE)
    lora_dropout: float = setting("dropout on the LoRA branch's input", 0.05, bounds=DROPOUT)
    # compute
    dtype: str = setting('"bfloat16": frozen weights bf16, trainable fp32, bf16 autocast; "float32": all fp32',
                         "bfloat16", ("bfloat16", "float32"))
    quantize_base: str | None = setting("the decoder's frozen linear layers in 8 or 4 bits (QLoRA; llavarad/model/quant.py)", None, MODES)
    activation_checkpointing: str = setting(
        'per decoder block: "full" recomputes the block, "selective" keeps its matmul outputs, "none" keeps all',
        "full", ("full", "selective", "none"), resume=True)
    num_workers: int = setting("DataLoader worker processes per rank (image decoding + preprocessing)", 4, resume=True,
                               bounds=NON_NEGATIVE)
    seed: int = setting("seeds the new weights, the data order and the LoRA dropout", 0, bounds=Bounds(0, 2**32 - 1))
    max_missing_frac: float = setting("fail when more than this fraction of the dataset's images is unreadable", 0.001,
                                      resume=True, bounds=FRACTION)
    # logging and checkpoints
    log_every: int = setting("steps between lines of metrics.jsonl", 10, resume=True, bounds=AT_LEAST_1)
    save_every: int = setting("steps between checkpoints (0: only the final outputs)", 1000, resume=True, bounds=NON_NEGATIVE)
    keep_checkpoints: int = setting("older checkpoints are deleted once a newer one is complete", 1, resume=True,
                                    bounds=AT_LEAST_1)
    resume: bool = setting("continue from the newest checkpoint in output/checkpoints, with the same settings", False)
    peak_tflops: float = setting("the device's dense bf16 peak, for the MFU figure (H100 SXM: 989)", 989.0, resume=True,
                                 bounds=POSITIVE)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["choices"] and value is not None and value not in f.metadata["choices"]:
                raise ValueError(f"{f.name} {value!r}: choose from {', '.join(f.metadata['choices'])}")
            if problem := bounds_problem(f, value):
                raise ValueError(f"{f.name} {value!r}: {problem}")
        if self.stage == "lora" and not self.projector:
            raise ValueError("the lora stage needs --projector (the pretrain stage's mm_projector.bin)")

    def to_dict(self) -> dict:
        return asdict(self)


def bounds_problem(f: Field, value: float) -> str | None:
    """What a number outside the field's bounds must be, or None."""
    bounds = f.metadata["bounds"]
    if bounds is None or bounds.holds(value):
        return None
    return f"must be {'an integer' if f.type is int else 'a finite number'} {bounds}"


def resume_changes(saved: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """The settings a resumed run changes, as "name old -> new": (refused, allowed). Refused: every
    field that changes the trained weights; allowed: those marked `resume` (logging, validation,
    checkpointing, workers, the run's length)."""
    refused, allowed = [], []
    for f in fields(cfg):
        if f.name == "resume":  # the request to resume, not a setting of the run
            continue
        old, new = saved.get(f.name, f.default), getattr(cfg, f.name)
        if old != new:
            (allowed if f.metadata["resume"] else refused).append(f"{f.name} {old!r} -> {new!r}")
    return refused, allowed


def resume_safe_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig) if f.metadata["resume"]]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(f: Field) -> str:
    bounds = f"{f.metadata['bounds']}; " if f.metadata["bounds"] else ""
    default = "required" if f.default is MISSING else f"default: {f.default}"
    safe = "; may change on --resume" if f.metadata["resume"] else ""
    return f"{f.metadata['doc']} ({bounds}{default}{safe})".replace("%", "%%")  # argparse formats help with %


def _parser(f: Field) -> Callable[[str], object]:
    """The flag's text -> the field's value; a number outside the field's bounds is argparse's usage error."""
    parse = PARSERS[f.type]
    if f.metadata["bounds"] is None:
        return parse

    def checked(text: str) -> float:
        value = parse(text)  # not a number: argparse says "invalid float value"
        if problem := bounds_problem(f, value):
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value

    checked.__name__ = parse.__name__
    return checked


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
            p.add_argument(_flag(f.name), dest=f.name, type=_parser(f), default=None, help=_help(f),
                           choices=f.metadata["choices"] or None,
                           metavar=None if f.metadata["choices"] else f.name.upper())  # choices show as {a,b}
    args = vars(p.parse_args(argv))
    try:  # every problem with the settings is a usage error: one line after the usage, exit code 2
        values = read_toml(Path(args.pop("config"))) if args.get("config") else {}
        values.update({k: v for k, v in args.items() if v is not None})
        missing = [f.name for f in fields(TrainConfig) if f.default is MISSING and f.name not in values]
        if missing:
            raise ValueError("missing " + ", ".join(_flag(m) for m in missing) + " (on the command line or in --config)")
        return TrainConfig(**values)
    except (OSError, ValueError) as e:
        p.error(str(e))


def read_toml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        values = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: malformed TOML ({e})") from None
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{path}: unknown setting {key!r}")
        kind = known[key].type
        expected = {float: (int, float), str | None: str}.get(kind, kind)
        if not isinstance(value, expected) or (isinstance(value, bool) and kind is not bool):
            raise ValueError(f"{path}: {key} = {value!r} should be of type {kind}")
        if problem := bounds_problem(known[key], value):
            raise ValueError(f"{path}: {key} = {value!r}: {problem}")
    return values
