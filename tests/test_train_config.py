"""The training settings: TOML then flags, every number's range, the resume rules, the shipped
recipe files and the --help text (parse_train_args and TrainConfig, no training run)."""

from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from llavarad.train.config import TrainConfig, parse_train_args, resume_changes, resume_safe_fields


def test_config_file_then_flags(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('stage = "lora"\nlr = 1e-4\nglobal_batch = 64\nprojector = "p.bin"\n')
    required = ["--data", "d", "--image-folder", "i", "--base", "b", "--tower", "t", "--output", "o"]
    cfg = parse_train_args(["--config", str(config), *required, "--lr", "2e-4", "--resume"])
    assert (cfg.stage, cfg.lr, cfg.global_batch, cfg.projector, cfg.resume) == ("lora", 2e-4, 64, "p.bin", True)
    for text, message in [('stage = "lora"\nlearning_rate = 1e-4\n', f"{config}: unknown setting 'learning_rate'"),
                          ('stage = "pretrain"\nglobal_batch = "64"\n', "global_batch = '64' should be of type")]:
        config.write_text(text)
        assert message in usage_error(capsys, ["--config", str(config), *required])
    assert "missing --data" in usage_error(capsys, ["--stage", "pretrain"])


def usage_error(capsys, argv) -> str:
    """parse_train_args refuses argv with exit code 2: the usage, then one error line, which is returned."""
    with pytest.raises(SystemExit) as e:
        parse_train_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and sum("error" in line for line in err) == 1 and "Traceback" not in "".join(err), err
    return err[-1]


REQUIRED = ["--stage", "pretrain", "--data", "d", "--image-folder", "i", "--base", "b", "--tower", "t", "--output", "o"]


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "must be a finite number > 0"),
    ("--lr", "inf", "must be a finite number > 0"),
    ("--lr", "-1e-3", "must be a finite number > 0"),
    ("--lr", "0", "must be a finite number > 0"),
    ("--max-steps", "-3", "must be an integer >= 0"),
    ("--epochs", "0", "must be an integer >= 1"),
    ("--global-batch", "0", "must be an integer >= 1"),
    ("--micro-batch", "-2", "must be an integer >= 1"),
    ("--warmup-ratio", "1.5", "must be a finite number in [0, 1]"),
    ("--weight-decay", "-0.1", "must be a finite number >= 0"),
    ("--lora-dropout", "1", "must be a finite number in [0, 1)"),
    ("--lora-r", "0", "must be an integer >= 1"),
    ("--grad-clip", "nan", "must be a finite number >= 0"),
    ("--max-missing-frac", "2", "must be a finite number in [0, 1]"),
    ("--save-every", "-1", "must be an integer >= 0"),
    ("--seed", "-1", "must be an integer in [0, 4294967295]"),
    ("--peak-tflops", "0", "must be a finite number > 0"),
])
def test_a_setting_out_of_its_range_is_a_usage_error_naming_it(capsys, flag, value, message):
    assert usage_error(capsys, [*REQUIRED, f"{flag}={value}"]).endswith(f"error: argument {flag}: {value}: {message}")


def test_a_config_value_out_of_its_range_is_a_usage_error_naming_file_and_key(tmp_path, capsys):
    config = tmp_path / "c.toml"
    for text, message in [("lr = nan", "lr = nan: must be a finite number > 0"),
                          ("lr = -inf", "lr = -inf: must be a finite number > 0"),
                          ("max_steps = -3", "max_steps = -3: must be an integer >= 0"),
                          ("warmup_ratio = -0.1", "warmup_ratio = -0.1: must be a finite number in [0, 1]")]:
        config.write_text(text + "\n")
        assert usage_error(capsys, ["--config", str(config), *REQUIRED]).endswith(f"error: {config}: {message}")


def test_every_numeric_setting_has_bounds_shown_in_help_and_kept_by_the_dataclass(capsys):
    numeric = [f for f in fields(TrainConfig) if f.type in (int, float)]
    assert numeric and all(f.metadata["bounds"] is not None for f in numeric), [f.name for f in numeric if not f.metadata["bounds"]]
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(> 0; default: 0.001)" in out and "(in [0, 1); default: 0.05)" in out
    cfg = parse_train_args(REQUIRED)
    with pytest.raises(ValueError, match=r"^warmup_ratio nan: must be a finite number in \[0, 1\]$"):
        TrainConfig(**{**cfg.to_dict(), "warmup_ratio": float("nan")})


def test_resume_names_only_the_settings_that_changed():
    saved = parse_train_args(REQUIRED).to_dict()
    assert resume_changes(saved, parse_train_args([*REQUIRED, "--resume"])) == ([], [])
    assert resume_changes(saved, parse_train_args([*REQUIRED, "--resume", "--max-steps", "9"])) == ([], ["max_steps 0 -> 9"])
    assert "resume" not in resume_safe_fields()


@pytest.mark.parametrize("name", ["pretrain", "lora"])
def test_shipped_configs_are_the_official_recipe(name):
    cfg = parse_train_args(["--config", str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"), "--data", "d", "--image-folder", "i", "--base", "b",
                            "--tower", "t", "--output", "o", "--projector", "p"])
    recipe = {"pretrain": (1e-3, 1, 256), "lora": (1e-4, 3, 64)}[name]
    assert (cfg.stage, cfg.lr, cfg.epochs, cfg.global_batch) == (name, *recipe)
    assert (cfg.warmup_ratio, cfg.weight_decay, cfg.max_len, cfg.dtype) == (0.03, 0.0, 2048, "bfloat16")
    assert (cfg.grad_clip, cfg.loss_norm) == (0.0, "global")  # the official runs had no clipping
    if name == "lora":
        assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (64, 128.0, 0.05)


def test_help_shows_each_fields_documentation_default_and_choices(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert " ".join(f.metadata["doc"].split()[:4]) in out, f.name
        if f.default is not MISSING:
            assert f"default: {f.default}" in out, f.name
    assert "--loss-norm {global,micro}" in out and "--stage {pretrain,lora}" in out
    assert "--dtype {bfloat16,float32}" in out and "--activation-checkpointing {full,selective,none}" in out
