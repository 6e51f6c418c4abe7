"""`python -m llavarad.demo DIR`: the folders are in the real layouts (transformers, peft and timm read
them and compute what our loader computes), and every command it prints runs: infer.py on one image
and on the query file, evaluate.py, both training stages, infer.py on the trained release, an int8
export and infer.py on it."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from _vision_fixtures import official_hidden_states
from peft import PeftModel
from transformers import LlamaForCausalLM

import evaluate
import infer
import train
from llavarad.demo import TINY_TOWER, try_commands
from llavarad.demo import main as demo_main
from llavarad.export import main as export_main
from llavarad.model.weights import load_tower
from llavarad.model.weights import load_llavarad

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"infer.py": infer.main, "evaluate.py": evaluate.main, "train.py": train.main, "llavarad.export": export_main}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(folder, the printed commands): written by the command line, as a user would."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    proc = subprocess.run([sys.executable, "-m", "llavarad.demo", str(root)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "RANDOM" in lines[0] and "meaningless" in lines[0]
    return root, [shlex.split(line) for line in lines if line.startswith("python ")]


def test_base_and_release_load_in_transformers_and_peft_as_in_ours(demo):
    root, _ = demo
    hf = LlamaForCausalLM.from_pretrained(root / "base", torch_dtype=torch.float32)
    reference = PeftModel.from_pretrained(hf, root / "release").merge_and_unload().eval()
    ours, tokenizer = load_llavarad(str(root / "release"), str(root / "base"), torch.float32, "cpu")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits  # (B, T, vocab)
        h = ours.llm(ours.llm.embed_tokens(ids), torch.arange(11).expand(2, -1))
        got = ours.llm.lm_head(h)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    adapter = json.loads((root / "release" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and (root / "release" / "adapter_model.safetensors").is_file()


def test_tower_checkpoint_loads_in_timm_as_in_ours(demo):
    root, _ = demo
    cfg = TINY_TOWER
    trunk = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, init_values=1.0, img_size=cfg.image_size,
                              embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_hidden / cfg.width).eval()
    state = torch.load(root / "release" / "biomedclipcxr_518_checkpoint.pt", weights_only=True)["state_dict"]
    trunk.load_state_dict({k.removeprefix("module.visual.trunk."): v for k, v in state.items()}, strict=True)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = official_hidden_states(trunk, pixels)[-2][:, 1:]  # LLaVA-Rad's features, CLS dropped
        ours = load_tower(str(root / "release" / "biomedclipcxr_518.json"), str(root / "release" / "biomedclipcxr_518_checkpoint.pt"))
        torch.testing.assert_close(ours(pixels), expected, rtol=1e-5, atol=1e-5)


def test_every_printed_command_runs(demo, capsys, monkeypatch):
    root, commands = demo
    monkeypatch.chdir(ROOT)  # the commands name configs/*.toml relative to the repository
    programs = [c[2] if c[1] == "-m" else c[1] for c in commands]  # python -m MODULE or python SCRIPT
    assert programs == ["infer.py", "infer.py", "evaluate.py", "train.py", "train.py", "infer.py", "llavarad.export", "infer.py"]
    outputs = []
    for program, command in zip(programs, commands):
        faster = ["--max-new-tokens", "16", "--workers", "0"] if "--query-file" in command else ["--max-new-tokens", "16"]
        argv = command[command.index(program) + 1 :] + (faster if program == "infer.py" else [])  # the last of a repeated flag wins
        capsys.readouterr()
        assert PROGRAMS[program](argv) == 0, (command, capsys.readouterr().err)
        outputs.append(capsys.readouterr().out)
    assert outputs[0].strip() and outputs[-1].strip()  # one findings text each (random words)
    predictions = [json.loads(line) for line in (root / "preds.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [f"demo{i}" for i in range(8)]
    assert all(p["prediction"] for p in predictions) and len({p["prediction"] for p in predictions}) > 1
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["records"]["scored"] == 8 and "BLEU-4" in metrics["metrics"]
    assert (root / "runs" / "pretrain" / "mm_projector.bin").is_file()
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"} <= {p.name for p in (root / "runs" / "lora").iterdir()}


def test_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert demo_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: ") and err.count("\n") == 1
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


def test_readme_shows_the_commands_the_demo_prints():
    """The README's "Try it without the weights" commands are the ones tested above (for DIR = demo)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it without the weights")[1].split("\n## ")[0]
    lines = section.replace("\\\n", " ").splitlines()
    shown = [" ".join(line.split()) for line in lines if line.strip().startswith(("python infer.py", "python evaluate.py", "python train.py", "python -m llavarad.export"))]
    assert shown == try_commands(Path("demo")).splitlines()


def test_the_readme_demo_folder_is_ignored_by_git():
    """`python -m llavarad.demo demo` in the checkout, as the README says, leaves git status clean."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = ["demo/base/config.json", "demo/release/adapter_model.safetensors", "demo/preds.jsonl"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == files


def test_readme_cpu_line_takes_torchvision_from_the_cpu_index_too():
    """torchvision from the default index, as `.[test]` would fetch it, pins the newest torch: a CUDA
    build that replaces the CPU one (issue 18.10; checked with pip install --dry-run --report)."""
    readme = (ROOT / "README.md").read_text()
    lines = [line.strip() for line in readme.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert lines == ["pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"]
