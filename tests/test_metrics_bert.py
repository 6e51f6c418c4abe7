"""The BERT encoder equals transformers `BertModel`, loaded from a `chexbert.pth`-layout checkpoint."""

import pytest
import torch

from _metrics_fixtures import chexbert_state_dict, random_bert
from llavarad.metrics.bert import BertConfig, load_bert


@pytest.fixture(scope="module")
def ref():
    return random_bert(vocab_size=50)


def test_config_read_from_tensors(ref):
    cfg = BertConfig.from_state_dict(chexbert_state_dict(ref), "module.bert.")
    assert cfg == BertConfig(vocab_size=50, hidden=128, layers=2, heads=2, intermediate=256, max_positions=512, type_vocab=2)


def test_forward_equals_transformers(ref, tmp_path):
    path = tmp_path / "chexbert.pth"
    torch.save({"model_state_dict": chexbert_state_dict(ref)}, path)
    sd = torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
    ours = load_bert(sd, "module.bert.")
    assert sorted(n for n, _ in ours.named_parameters()) == sorted(
        n for n, _ in ref.named_parameters() if not n.startswith("pooler.")
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 17), generator=g)
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 9:] = 0  # padded rows, as in a CheXbert batch
    mask[2, 2:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_checkpoints_name_the_key(ref):
    sd = chexbert_state_dict(ref)
    missing = {k: v for k, v in sd.items() if k != "module.bert.encoder.layer.1.output.dense.bias"}
    with pytest.raises(ValueError, match="missing module.bert.encoder.layer.1.output.dense.bias"):
        load_bert(missing, "module.bert.")
    unknown = dict(sd, **{"module.bert.encoder.layer.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown module.bert.encoder.layer.0.extra.weight"):
        load_bert(unknown, "module.bert.")
    shaped = dict(sd, **{"module.bert.embeddings.LayerNorm.weight": torch.zeros(7)})
    with pytest.raises(ValueError, match="embeddings.LayerNorm.weight has shape"):
        load_bert(shaped, "module.bert.")
    with pytest.raises(ValueError, match="no key 'bert.embeddings.word_embeddings.weight'"):
        load_bert(sd, "bert.")
