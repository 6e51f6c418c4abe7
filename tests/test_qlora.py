"""QLoRA (`train.py --quantize-base`) on the tiny training world: the gradients are those of a float
base holding the dequantized weights, a run overfits, and its release loads in infer.py (with and
without --quantize) and in peft. Also int8 greedy decoding keeps the float model's tokens."""

import copy

import pytest
import torch
from _llama_fixtures import our_logits
from _train_fixtures import FINDINGS, N_IMAGE, REASONS, VOCAB, read_metrics, train_args, write_base_and_tower, write_data
from peft import PeftModel
from transformers import LlamaForCausalLM

import infer
import train
from llavarad.model.config import LoRAConfig
from llavarad.model.llava import Projector
from llavarad.model.lora import LoRALinear
from llavarad.model.quant import QuantLinear
from llavarad.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Tokenizer
from llavarad.model.weights import load_llavarad, load_llm
from llavarad.train.model import build_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The decoder trained to write finding k after "word k" (see _train_fixtures), 8 samples, a random projector."""
    root = tmp_path_factory.mktemp("qlora")
    base, tower = write_base_and_tower(root)
    data, images = write_data(root)
    torch.manual_seed(0)
    projector = root / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in Projector(32, 64).state_dict().items()}, projector)
    return root, base, tower, data, images, projector


def test_int8_greedy_tokens_equal_float(world):
    """The fixture's decoder was trained (60 AdamW steps) to write finding k after 4 copies of an
    unused "word k" token, so on those prompts its greedy steps have top-1 margins of several logits,
    far above int8's logit error: equal tokens are then expected, not lucky, and the test checks
    that too (margin > 5 x the largest int8 logit error at each of the 8 steps)."""
    base = world[1]
    tokenizer = Tokenizer(str(base / "tokenizer.model"))
    ref, q8 = (load_llm(base, torch.float32, "cpu", quantize=mode) for mode in (None, "int8"))
    for k in range(3):
        ids = tokenizer.encode_prompt("<image>")
        at = ids.index(IMAGE_TOKEN_INDEX)
        prompt = ids[:at] + [VOCAB - 1 - k] * N_IMAGE + ids[at + 1:]
        tokens_ref, tokens_q8, margins, errors = list(prompt), list(prompt), [], []
        for _ in range(8):  # greedy, uncached: the whole sequence again at every step
            a, b = our_logits(ref, torch.tensor([tokens_ref]))[0, -1], our_logits(q8, torch.tensor([tokens_q8]))[0, -1]
            top2 = a.topk(2).values
            margins.append((top2[0] - top2[1]).item())
            errors.append((a - b).abs().max().item())
            tokens_ref.append(int(a.argmax()))
            tokens_q8.append(int(b.argmax()))
        assert tokens_q8 == tokens_ref
        text = tokenizer.decode(tokens_ref[len(prompt):])
        assert len(text) > 5 and FINDINGS[k].startswith(text), text  # it writes its finding
        assert min(margins) > 5 * max(errors), (margins, errors)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gradients_equal_float_base_with_dequantized_weights(world, mode):
    """LoRA A, B and projector gradients with the quantized base == with a float base whose weights
    are the dequantized weights (B randomised, else A's gradient is zero)."""
    root, base, tower, _, _, projector = world
    torch.manual_seed(0)
    model = build_model("lora", str(base), str(tower), str(projector), LoRAConfig(r=8, alpha=16, dropout=0.0),
                        torch.float32, torch.device("cpu"), quantize_base=mode)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 14 and all(isinstance(m.quantized, QuantLinear) for m in layers)
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_(0, 0.1)
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, LoRALinear):
            m.weight = torch.nn.Parameter(m.quantized.dequantized().float(), requires_grad=False)
            m.quantized = None
    g = torch.Generator().manual_seed(1)
    ids = [[1, IMAGE_TOKEN_INDEX, *torch.randint(3, 400, (10,), generator=g).tolist()] for _ in range(2)]  # (2, 12)
    labels = torch.tensor([[IGNORE_INDEX] * (1 + N_IMAGE) + row[2:] for row in ids])  # (2, 12 - 1 + N_IMAGE)
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    for m in (model, twin):
        m(pixels, ids, labels).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 14 * 2 + 4
    for name, p in twin.named_parameters():
        if p.requires_grad:
            assert grads[name].abs().max() > 0, name
            # float32 both ways; the int8 kernel sums in another order than F.linear: 1e-4 of the largest gradient
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-4 * p.grad.abs().max().item(),
                                       msg=lambda m: f"{name}: {m}")


def test_qlora_run_overfits_and_its_release_loads_everywhere(world, capsys):
    """20 steps of int4 QLoRA drive the loss below a tenth; the release then writes the learned
    findings through infer.py on an int4 base and on the float base (in float32, the dtype it was
    trained in: the tiny model's margins do not survive bfloat16), and loads in peft, whose logits
    equal our float load of it."""
    root, base, tower, data, images, projector = world
    assert train.main(train_args(root, base, tower, data, images, "qlora", stage="lora", projector=projector,
                                 quantize_base="int4", max_steps=20, activation_checkpointing="full")) == 0
    losses = [r["loss"] for r in read_metrics(root / "qlora") if "loss" in r]
    assert len(losses) == 20 and losses[-1] < 0.1 * losses[0], losses
    capsys.readouterr()  # the training log
    release = root / "qlora"
    for k, quantize in ((0, ["--quantize", "int4", "--dtype", "float32"]), (1, []), (2, ["--quantize", "int8", "--dtype", "float32"])):
        argv = [str(images / "p10" / f"s{k}.png"), "--model", str(release), "--base", str(base), "--max-new-tokens", "20", *quantize]
        assert infer.main(argv + (["--reason", REASONS[k]] if REASONS[k] else [])) == 0
        assert capsys.readouterr().out.strip() == FINDINGS[k]

    model, _ = load_llavarad(str(release), str(base), torch.float32, "cpu")
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), release).eval()
    ids = torch.randint(3, 400, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(our_logits(model.llm, ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
