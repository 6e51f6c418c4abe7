"""LoRA against peft: a saved adapter merged by us == peft's merge_and_unload, and our unmerged
LoRALinear forward == peft's unmerged forward."""

import pytest
import torch
from _llama_fixtures import tiny_hf_llama, write_base
from peft import LoraConfig, get_peft_model

from llavarad.model.config import LoRAConfig
from llavarad.model.lora import apply_lora, lora_state_dict
from llavarad.model.weights import load_adapter, load_llm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(hf, folder, safetensors=True):
    """A peft LoRA (r 8, alpha 16) with random non-zero A and B, saved in the release layout."""
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # peft starts B at zero: randomise both
    peft_model.save_pretrained(folder, safe_serialization=safetensors)
    return peft_model.eval()


@pytest.mark.parametrize("safetensors", [True, False])
def test_merged_adapter_matches_peft_merge_and_unload(tmp_path, safetensors):
    hf = tiny_hf_llama()
    base = write_base(hf, tmp_path / "base")
    peft_model = peft_adapter(hf, tmp_path / "release", safetensors)
    assert (tmp_path / "release" / ("adapter_model.safetensors" if safetensors else "adapter_model.bin")).is_file()
    adapter, scale = load_adapter(tmp_path / "release")
    assert len(adapter) == 2 * 7 * 2 and scale == 2.0
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        unmerged_ref = peft_model(ids).logits
        ref = peft_model.merge_and_unload()(ids).logits
        llm = load_llm(base, torch.float32, "cpu", adapter=adapter, scale=scale)
        ours = llm.lm_head(llm(llm.embed_tokens(ids), torch.arange(13).expand(2, 13)))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, unmerged_ref, atol=1e-4, rtol=1e-4)


def test_unmerged_lora_linear_matches_peft(tmp_path):
    hf = tiny_hf_llama()
    base = write_base(hf, tmp_path / "base")
    peft_model = peft_adapter(hf, tmp_path / "release")
    adapter, scale = load_adapter(tmp_path / "release")
    llm = load_llm(base, torch.float32, "cpu")
    replaced = apply_lora(llm, LoRAConfig(r=8, alpha=16, dropout=0.0))
    assert len(replaced) == 2 * 7
    assert set(lora_state_dict(llm)) == set(adapter)
    llm.load_state_dict(adapter, strict=False)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = llm.lm_head(llm(llm.embed_tokens(ids), torch.arange(9)[None]))
        torch.testing.assert_close(ours, peft_model(ids).logits, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable if "layers" in n and "proj" in n)
