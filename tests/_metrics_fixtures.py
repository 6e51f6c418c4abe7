"""Tiny vocab, tiny random BERT / CheXbert checkpoints and varied report texts for the metric tests."""

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the lungs are clear no pleural effusion heart size is normal there mild pulmonary edema "
    "left right basal atelectasis consolidation pneumothorax cardiomegaly stable enlarged "
    "cm mm of and with in a to at 2 5 1 0 3 . , ; : - ( ) / % ' \" ? ! # [ ] __ _ e é cafe "
    "un aff able 中 文 σ ς ß x ray chest ap pa view tube line"
).split()
PIECES = "##ς ##s ##ed ##ing ##able ##aff ##al ##ly ##ion ##e ##5 ##0 ##1 ##x ##ray ##ic ##ar".split()


def write_vocab(path) -> list[str]:
    """A small vocab.txt in BERT's layout: specials first, then words and ## continuations."""
    tokens = SPECIAL + list(dict.fromkeys(WORDS + PIECES))
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return tokens


def tiny_bert_config(vocab_size: int):
    from transformers import BertConfig

    # hidden 128 -> 2 heads of 64, the rule the loader infers from the tensors.
    return BertConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def random_bert(vocab_size: int, seed: int = 0):
    """A transformers `BertModel` with random, non-trivial weights (LayerNorms and biases perturbed)."""
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel(tiny_bert_config(vocab_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def chexbert_state_dict(bert, seed: int = 0) -> dict:
    """The public `chexbert.pth` layout: DataParallel `module.` prefix, BERT + 14 linear heads."""
    g = torch.Generator().manual_seed(seed + 1)
    hidden = bert.config.hidden_size
    sd = {f"module.bert.{k}": v.clone() for k, v in bert.state_dict().items()}
    sd["module.bert.embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
    for i in range(14):
        n = 2 if i == 13 else 4
        # Large weights so that the tiny model's labels differ between reports.
        sd[f"module.linear_heads.{i}.weight"] = 3 * torch.randn(n, hidden, generator=g)
        sd[f"module.linear_heads.{i}.bias"] = torch.randn(n, generator=g)
    return sd


REPORTS = [
    "",
    "   ",
    "The lungs are clear. No pleural effusion.",
    "Heart size is normal; there is mild pulmonary edema.",
    "Left basal atelectasis, 2.5 cm. Stable cardiomegaly!!",
    "Enlarged heart (2.5 cm x 1.0 cm), 5 mm nodule at 50% of the tube.",
    "No pneumothorax. No pneumothorax. No pneumothorax.",
    "CAFÉ café Café naïve résumé coöperate",
    "unaffable UNAFFABLE unaffableness",
    "中文 report 中 文 mixed中文text",
    "ΣΑΣ σας ς ΣΣ Straße STRASSE",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em-space",
    "control\x00chars\x07here\ufffdand\u200bzero width",
    "[CLS] special [SEP] tokens [MASK] kept [UNK] [PAD] [cls] lower",
    "[CL\x00S] joined by cleaning",
    "___ deidentified ___ __ _",
    "a" * 101 + " " + "b" * 100 + " x",
    "punctuation!?;:\"'()[]{}<>@#$%^&*~`|\\/+=-_",
    "Support devices: ET tube, NG tube and right PICC line. AP view of the chest.",
    "¿Qué? «quoted» — dash – en-dash … ellipsis • bullet",
    "numbers 1,000.5 3/4 10x 2mm 1e-5 0.25cm",
    "émoji 😀 and symbols ™ © ° ± µm",
]
