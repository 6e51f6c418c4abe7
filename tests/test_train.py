"""Both training stages on a tiny model (CPU, float32): they overfit, their outputs load in our
infer.py, in peft and in stage 2, the lr schedule is transformers', and bad runs fail clearly (the
settings alone: test_train_config.py)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _bench_fixtures import load_bench
from _train_fixtures import FINDINGS, REASONS, read_metrics, train_args, write_base_and_tower, write_data
from peft import PeftModel
from torch import nn
from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

import infer
import train
from _release_fixtures import write_tiny_release
from llavarad.model.config import LoRAConfig
from llavarad.model.llava import Projector
from llavarad.model.tokenizer import IGNORE_INDEX
from llavarad.model.weights import load_llavarad
from llavarad.train.loop import get_lr, train_step
from llavarad.train.loss import loss_weights
from llavarad.train.model import build_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1 then stage 2 on 8 samples, 30 steps each; stage 2 also validates on the training file."""
    root = tmp_path_factory.mktemp("train")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    base, tower = write_base_and_tower(root)
    data, images = write_data(root)
    assert train.main(train_args(root, base, tower, data, images, "pretrain", activation_checkpointing="none")) == 0
    assert train.main(train_args(root, base, tower, data, images, "lora", stage="lora", projector=root / "pretrain" / "mm_projector.bin",
                                 activation_checkpointing="selective", val_data=data, val_every=15)) == 0
    torch.set_num_threads(n)
    return root, base, tower, data, images


@pytest.mark.parametrize("stage", ["pretrain", "lora"])
def test_overfitting_eight_samples(runs, stage):
    losses = [r["loss"] for r in read_metrics(runs[0] / stage) if "loss" in r]
    assert len(losses) == 30
    assert losses[-1] < 0.1 * losses[0], losses


def test_validation_loss_is_logged(runs):
    val = [r["val_loss"] for r in read_metrics(runs[0] / "lora") if "val_loss" in r]
    train_losses = [r["loss"] for r in read_metrics(runs[0] / "lora") if "loss" in r]
    assert len(val) == 2 and val[1] < val[0] < train_losses[0]


def test_pretrain_outputs_official_layout_and_load_into_stage_2(runs):
    root, base, tower, _, _ = runs
    saved = torch.load(root / "pretrain" / "mm_projector.bin", weights_only=True)
    assert sorted(saved) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    model = build_model("lora", str(base), str(tower), str(root / "pretrain" / "mm_projector.bin"), LoRAConfig(r=8, alpha=16),
                        torch.float32, torch.device("cpu"))
    for key, value in saved.items():  # the official loader's rule: the key after "mm_projector."
        assert torch.equal(model.projector.state_dict()[key.split("mm_projector.")[1]], value)
    cfg = json.loads((root / "pretrain" / "config.json").read_text())
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_hidden_size"] == 32


def test_lora_release_is_the_trained_weights_and_loads_in_peft(runs):
    root, base, _, _, _ = runs
    release = root / "lora"
    assert {"config.json", "adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin",
            "biomedclipcxr_518.json", "biomedclipcxr_518_checkpoint.pt"} <= {p.name for p in release.iterdir()}
    trained = torch.load(release / "checkpoints" / "step_0000030" / "rank0.pt", weights_only=True)["params"]
    projector = torch.load(release / "non_lora_trainables.bin", weights_only=True)
    for key, value in projector.items():
        assert torch.equal(value, trained["projector." + key.removeprefix("base_model.model.model.mm_projector.")])
    model, _ = load_llavarad(str(release), str(base), torch.float32, "cpu")
    for key, value in model.projector.state_dict().items():
        assert torch.equal(value, trained["projector." + key])

    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), release).eval()
    assert sum("lora_A" in n for n, _ in hf.named_parameters()) == 2 * 7
    ids = torch.randint(3, 400, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.llm.lm_head(model.llm(model.llm.embed_tokens(ids), torch.arange(17).expand(2, 17)))
        torch.testing.assert_close(ours, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_infer_cli_on_the_lora_release_writes_the_learned_findings(runs, capsys):
    root, base, _, _, images = runs
    for k in (0, 1):  # with and without a reason for exam
        argv = [str(images / "p10" / f"s{k}.png"), "--model", str(root / "lora"), "--base", str(base), "--max-new-tokens", "20"]
        if REASONS[k]:
            argv += ["--reason", REASONS[k]]
        assert infer.main(argv) == 0
        assert capsys.readouterr().out.strip() == FINDINGS[k]


def test_lr_schedule_is_transformers_cosine_with_warmup():
    for total in (7, 100, 1562):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
        sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.03 * total), total)
        for step in range(total):
            assert get_lr(step, total, 2e-4, 0.03) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
            opt.step()
            sched.step()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    base, tower = write_base_and_tower(root, reads_context=False)
    data, images = write_data(root)
    return root, base, tower, data, images


def run_main(small, capsys, output, **overrides):
    root, base, tower, data, images = small
    rc = train.main(train_args(root, base, tower, data, images, output, **{"max_steps": 2, **overrides}))
    captured = capsys.readouterr()
    return rc, captured.out + captured.err  # the log lines (stdout), warnings and errors (stderr)


def test_error_global_batch_not_divisible(small, capsys, tmp_path):
    rc, err = run_main(small, capsys, tmp_path, global_batch=6)
    assert rc == 1 and "error: global_batch 6 is not a multiple of micro_batch 4 x world size 1" in err


def test_error_projector_shape(small, capsys, tmp_path):
    bad = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 16), "model.mm_projector.0.bias": torch.zeros(64),
                "model.mm_projector.2.weight": torch.zeros(64, 64), "model.mm_projector.2.bias": torch.zeros(64)}, bad)
    rc, err = run_main(small, capsys, tmp_path / "a", stage="lora", projector=bad)
    assert rc == 1 and "mm_projector.0.weight has shape (64, 16), expected (64, 32)" in err and "tower width 32" in err
    with pytest.raises(SystemExit) as e:
        run_main(small, capsys, tmp_path / "b", stage="lora")
    assert e.value.code == 2 and "error: the lora stage needs --projector" in capsys.readouterr().err


def test_error_missing_images_over_threshold(small, capsys, tmp_path):
    root, base, tower, data, images = small
    records = json.loads(data.read_text())
    records[3]["image"] = "mimic/p10/gone.png"
    (tmp_path / "d.json").write_text(json.dumps(records))
    rc, err = run_main((root, base, tower, tmp_path / "d.json", images), capsys, tmp_path / "a", max_missing_frac=0.2)
    assert rc == 0 and "gone.png" in err, err  # 1 of 8 is under the threshold: skipped
    rc, err = run_main((root, base, tower, tmp_path / "d.json", images), capsys, tmp_path / "b", max_missing_frac=0.1)
    assert rc == 1 and "error: 1 of 8 images read under" in err and "check --image-folder" in err


def test_error_existing_run_without_resume(small, capsys, tmp_path):
    rc, err = run_main(small, capsys, tmp_path)
    assert rc == 0
    rc, err = run_main(small, capsys, tmp_path)
    assert rc == 1 and "already holds checkpoints" in err and "--resume" in err


def test_fine_tune_from_the_release_folder(tmp_path, capsys):
    """A hospital's fine-tune: --tower and --projector taken from the released LLaVA-Rad folder."""
    tiny = write_tiny_release(tmp_path)
    data, images = write_data(tmp_path)
    args = train_args(tmp_path, tiny.base, tiny.release, data, images, "ft", stage="lora",
                      projector=tiny.release / "non_lora_trainables.bin", max_steps=1, lr=1e-12)
    assert train.main(args) == 0
    saved = torch.load(tmp_path / "ft" / "non_lora_trainables.bin", weights_only=True)
    for key, value in tiny.projector.items():  # one AdamW step of lr 1e-12 moves a weight by about 1e-12
        torch.testing.assert_close(saved[f"base_model.model.model.mm_projector.{key}"], value, rtol=0, atol=1e-10)


def test_train_bench_smoke_matches_transformers_peft(tmp_path):
    """bench/train_bench.py --tiny on the CPU: every row runs, and given our spliced input embeddings,
    the same weights and labels, transformers + peft's first step equals ours in float32: the loss
    (far from ln(vocab), so it depends on the weights and inputs) and every LoRA gradient's norm.
    So the benchmark compares equal work."""
    bench = load_bench("train_bench")
    assert bench.main(["--tiny", "--steps", "1", "--modes", "full,selective", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["implementation"].split(",")[0] for r in rows] == ["llavarad", "llavarad", "transformers + peft"]
    ours, hf = rows[0], rows[2]
    assert rows[1]["first_loss"] == ours["first_loss"]
    assert abs(ours["first_loss"] - math.log(bench.LLAMA_PRESETS["tiny"].vocab_size)) > 1.0
    assert hf["first_loss"] == pytest.approx(ours["first_loss"], rel=1e-4)
    grads = ours["first_lora_grad_norms"]
    assert len(grads) == 2 * 7 * 2  # lora_A and lora_B of 7 modules in each of the 2 layers
    assert min(g for name, g in grads.items() if name.endswith("lora_B")) > 1e-3  # lora_A's is 0 while B = 0
    assert hf["first_lora_grad_norms"] == pytest.approx(grads, rel=1e-4)


class Toy(nn.Module):
    """train_step's model interface on a 3 -> 5 linear map per token: the summed cross-entropy over the
    supervised positions (the pixels stand in for the decoder's hidden states)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(3, 5, bias=False)

    def set_requires_gradient_sync(self, _: bool) -> None:
        pass

    def forward(self, pixels, ids, labels):
        keep = labels != IGNORE_INDEX
        return F.cross_entropy(self.w(pixels)[keep], labels[keep], reduction="sum")


def toy_micro_batches():
    """Two micro-batches of 2 x 4 tokens with 3 and 5 supervised tokens."""
    g = torch.Generator().manual_seed(0)
    micro = []
    for supervised in ([[1, 0, 0, 0], [1, 1, 0, 0]], [[1, 1, 1, 0], [1, 1, 0, 0]]):
        keep = torch.tensor(supervised, dtype=torch.bool)
        labels = torch.randint(0, 5, (2, 4), generator=g).masked_fill(~keep, IGNORE_INDEX)
        micro.append({"pixels": torch.randn(2, 4, 3, generator=g), "ids": None, "labels": labels,
                      "n_supervised": int(keep.sum())})
    return micro


def sgd_step(micro, loss_norm: str, grad_clip: float) -> torch.Tensor:
    """-(the update) of one train_step with SGD at lr 1: the gradient it stepped with."""
    torch.manual_seed(0)
    toy = Toy()
    before = toy.w.weight.detach().clone()
    weights = loss_weights([b["n_supervised"] for b in micro], sum(b["n_supervised"] for b in micro), 1, loss_norm)
    train_step(toy, torch.optim.SGD(toy.parameters(), lr=0.0), micro, weights, 1.0, grad_clip)
    return before - toy.w.weight.detach()


def hand_gradient(micro, loss) -> torch.Tensor:
    torch.manual_seed(0)
    toy = Toy()
    loss(toy, micro).backward()
    return toy.w.weight.grad


def test_loss_norm_micro_is_the_official_per_micro_batch_mean_and_global_the_token_mean():
    micro = toy_micro_batches()
    assert [b["n_supervised"] for b in micro] == [3, 5]

    def official(toy, micro):  # HF Trainer: each micro-batch's CrossEntropyLoss (mean) / accumulation steps
        return sum(F.cross_entropy(toy.w(b["pixels"]).flatten(0, 1), b["labels"].flatten()) / len(micro) for b in micro)

    def per_token(toy, micro):  # every supervised token of the step alike
        return sum(toy(**{k: b[k] for k in ("pixels", "ids", "labels")}) for b in micro) / 8

    torch.testing.assert_close(sgd_step(micro, "micro", 0.0), hand_gradient(micro, official), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sgd_step(micro, "global", 0.0), hand_gradient(micro, per_token), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(hand_gradient(micro, official), hand_gradient(micro, per_token), rtol=1e-3)
    # Over ranks (FSDP then averages the gradients, / world): a token of a micro-batch with n supervised
    # tokens weighs 1 / (world x accum x n) in "micro", 1 / (the step's supervised tokens) in "global".
    world, accum = 2, 2
    assert [w / world for w in loss_weights([3, 5], 20, world, "micro")] == pytest.approx([1 / (2 * 2 * 3), 1 / (2 * 2 * 5)])
    assert [w / world for w in loss_weights([3, 5], 20, world, "global")] == pytest.approx([1 / 20, 1 / 20])
    assert loss_weights([0, 4], 4, 1, "micro") == [0.0, 1 / (accum * 4)]  # nothing supervised: adds nothing


def test_grad_clip_zero_is_no_clipping_and_positive_clips_the_global_norm():
    micro = toy_micro_batches()
    unclipped = hand_gradient(micro, lambda toy, micro: sum(toy(**{k: b[k] for k in ("pixels", "ids", "labels")})
                                                            for b in micro) / 8)
    torch.testing.assert_close(sgd_step(micro, "global", 0.0), unclipped, rtol=1e-6, atol=1e-7)
    clipped = sgd_step(micro, "global", 0.01)
    assert float(clipped.norm()) == pytest.approx(0.01, rel=1e-4)
    torch.testing.assert_close(clipped, unclipped * 0.01 / unclipped.norm(), rtol=1e-4, atol=1e-8)


def test_grad_clip_zero_trains(small, capsys, tmp_path):
    """The CLI with --grad-clip 0 learns exactly as without any clipping (a clip no gradient reaches)."""
    runs = {}
    for clip in (0, 1e9):
        rc, err = run_main(small, capsys, tmp_path / str(clip), grad_clip=clip, warmup_ratio=0.0)
        assert rc == 0, err
        runs[clip] = torch.load(tmp_path / str(clip) / "mm_projector.bin", weights_only=True)
    for key, value in runs[1e9].items():
        assert torch.equal(runs[0][key], value), key
    assert read_metrics(tmp_path / "0")[0]["grad_norm"] > 0


def test_an_epoch_keeps_its_last_partial_global_batch(small, capsys, tmp_path):
    """10 records at global batch 4: 3 steps per epoch as the official Trainer (ceil), not 2."""
    root, base, tower, _, _ = small
    data, images = write_data(tmp_path, n=10)
    rc, err = run_main((root, base, tower, data, images), capsys, tmp_path / "run", max_steps=0, epochs=2, global_batch=4)
    assert rc == 0 and "10 samples, 3 steps per epoch (the last with 2 samples), 6 steps" in err, err
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_settings_that_change_the_result(small, capsys, tmp_path):
    root, base, tower, data, images = small
    projector = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in Projector(32, 64).state_dict().items()}, projector)
    lora = dict(stage="lora", projector=projector, save_every=1)
    rc, err = run_main(small, capsys, tmp_path / "run", **lora)
    assert rc == 0, err
    for change, named in [({"lr": 0.05}, "lr 0.01 -> 0.05"), ({"lora_r": 4}, "lora_r 8 -> 4"),
                          ({"lr": 0.05, "seed": 3}, "lr 0.01 -> 0.05; seed 0 -> 3")]:
        rc, err = run_main(small, capsys, tmp_path / "run", resume=True, **lora, **change)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 1 and len(lines) == 1 and named in lines[0] and "Traceback" not in err, err
        assert "only val_data, val_every, epochs, max_steps" in lines[0]
    # Safe: a longer run, other logging; they are named.
    rc, err = run_main(small, capsys, tmp_path / "run", resume=True, **lora, max_steps=3, log_every=2, num_workers=1)
    assert rc == 0 and "resuming with changed settings: max_steps 2 -> 3; num_workers 0 -> 1; log_every 1 -> 2\n" in err, err
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_resume_of_a_checkpoint_that_does_not_fit_is_one_error_line(small, capsys, tmp_path):
    """Settings equal but the checkpoint's tensors of another shape (e.g. the base folder's files
    replaced), or a checkpoint without its settings (written before they were saved)."""
    root, base, tower, data, images = small
    projector = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in Projector(32, 64).state_dict().items()}, projector)
    lora = dict(stage="lora", projector=projector, max_steps=1, save_every=1)
    assert run_main(small, capsys, tmp_path / "run", **lora)[0] == 0
    meta_path = tmp_path / "run" / "checkpoints" / "step_0000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["lora_r"] = 4
    meta_path.write_text(json.dumps(meta))
    rc, err = run_main(small, capsys, tmp_path / "run", resume=True, lora_r=4, **lora)
    assert rc == 1 and "has shape (8, 64), this model's is (4, 64)" in err and "Traceback" not in err, err
    del meta["config"]
    meta_path.write_text(json.dumps(meta))
    rc, err = run_main(small, capsys, tmp_path / "run", resume=True, **lora)
    assert rc == 1 and "saved without the run's settings" in err and "Traceback" not in err, err
