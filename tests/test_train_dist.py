"""torchrun with 2 processes (gloo, FSDP2) trains exactly as 1 process at the same global batch, and a
run killed at any moment (even while saving) resumes to the same weights, bit for bit."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_fixtures import read_metrics, train_args, write_base_and_tower, write_data
from safetensors.torch import load_file

import train
from llavarad.model.llava import Projector
from llavarad.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base, tower = write_base_and_tower(root, reads_context=False)
    data, images = write_data(root)
    val, _ = write_data(root, n=5, name="val.json")  # 5: ranks need filler samples to stay in step
    torch.manual_seed(0)
    projector = root / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in Projector(32, 64).state_dict().items()}, projector)
    return root, base, tower, data, images, val, projector


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets for its workers
    yield
    torch.set_num_threads(n)


def lora_args(world, output, **overrides):
    root, base, tower, data, images, val, projector = world
    return train_args(root, base, tower, data, images, output, stage="lora", projector=projector, **overrides)


@pytest.mark.parametrize("quantize", [None, "int4"])  # int4: QLoRA, the frozen base quantized on every rank
def test_two_processes_match_one(world, one_thread, quantize):
    settings = dict(micro_batch=2, max_steps=4, activation_checkpointing="full", val_data=world[5], val_every=2,
                    quantize_base=quantize)
    one, two = f"one{quantize or ''}", f"two{quantize or ''}"
    assert train.main(lora_args(world, one, **settings)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *lora_args(world, two, **settings)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics_one, metrics_two = read_metrics(world[0] / one), read_metrics(world[0] / two)
    assert [sorted(r) for r in metrics_one] == [sorted(r) for r in metrics_two] and len(metrics_one) == 4 + 2
    for a, b in zip(metrics_one, metrics_two):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    adapter_one, adapter_two = (load_file(world[0] / run / "adapter_model.safetensors") for run in (one, two))
    for key, value in adapter_one.items():  # QLoRA: the int4 dequantize-then-matmul splits the batch's rows
        # differently in 1 and 2 processes; Adam makes those roundings visible in near-zero weights
        torch.testing.assert_close(adapter_two[key], value, rtol=1e-5, atol=1e-6 if quantize is None else 1e-5)


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_killed_run_resumes_bit_for_bit(world, one_thread, monkeypatch, quantize):
    settings = dict(max_steps=6, save_every=2, lora_dropout=0.05, num_workers=1,  # dropout: the RNG must resume too
                    quantize_base=quantize)
    whole, killed = f"whole{quantize or ''}", f"killed{quantize or ''}"
    assert train.main(lora_args(world, whole, **settings)) == 0

    save = torch.save

    def killed_while_saving_step_6(obj, path, *args, **kwargs):
        if "step_0000006.tmp" in str(path):
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt  # what a kill looks like from here: the process stops mid-write
        return save(obj, path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", killed_while_saving_step_6)
        with pytest.raises(KeyboardInterrupt):
            train.main(lora_args(world, killed, **settings))
    run = world[0] / killed
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004"]  # step 2 pruned, step 6 never committed
    assert (run / "checkpoints" / "step_0000006.tmp").is_dir()
    assert train.main(lora_args(world, killed, resume=True, **settings)) == 0

    expected = torch.load(world[0] / whole / "checkpoints" / "step_0000006" / "rank0.pt", weights_only=True)
    resumed = torch.load(run / "checkpoints" / "step_0000006" / "rank0.pt", weights_only=True)
    for key, value in expected["params"].items():
        assert torch.equal(resumed["params"][key], value), key
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(world[0] / whole)]
    assert not (run / "checkpoints" / "step_0000006.tmp").exists()
