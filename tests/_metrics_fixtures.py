"""Tiny vocab, tiny random BERT / CheXbert checkpoints, varied report texts, and the official
LLaVA-Rad evaluation re-built from its reference libraries (transformers, sklearn, scipy, sacrebleu,
rouge_score) to check ours against."""

import random
import re
import warnings

import numpy as np
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

    # hidden 128 -> 2 heads of 64, the rule the loader infers from the tensors. Weights 10x BERT's
    # init scale, so that the [CLS] state, hence the tiny CheXbert's labels, vary with the text.
    return BertConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=512, type_vocab_size=2, initializer_range=0.2,
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


PHRASES = [
    "The lungs are clear.", "No pleural effusion.", "No pneumothorax.", "Heart size is normal.",
    "Stable cardiomegaly.", "Mild pulmonary edema.", "Left basal atelectasis.", "Right lower lobe consolidation.",
    "A 2.5 cm nodule in the right upper lobe.", "ET tube 5 cm above the carina.", "Small bilateral pleural effusions!",
    "No acute cardiopulmonary process.", "Enlarged cardiomediastinal silhouette (unchanged).", "Possible pneumonia?",
    "Fracture of the left 5th rib; healed.", "Support devices: NG tube, PICC line.", "Lungs clear, clear, clear.",
    "Opacité basale gauche — improved.", "Résumé: no change since 10/12.", "Heart: normal; mediastinum: normal.",
]


def report_pairs(n: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """(predictions, references): random phrase mixes plus edge cases (empty, punctuation only,
    units, unicode, repeated words, CJK), at least `n` pairs."""
    rng = random.Random(seed)
    preds = [" ".join(rng.sample(PHRASES, rng.randint(1, 5))) for _ in range(n)]
    refs = [" ".join(rng.sample(PHRASES, rng.randint(1, 5))) for _ in range(n)]
    preds += ["", "", "...", "2.5 cm", "the the the the the", "中文 ΣΑΣ café"] + REPORTS
    refs += ["", "No effusion.", "!!!", "2.5 cm 2.5 cm", "the the", "café 中文"] + REPORTS[::-1]
    return preds, refs


# The official labeler's conditions in head order (rrg_eval/chexbert.py).
CHEXBERT_CONDITIONS = [
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices", "No Finding",
]


def reference_chexbert_labels(texts: list[str], sd: dict, vocab_path: str) -> np.ndarray:
    """CheXbert labels the way the official `rrg_eval/chexbert.py` computes them, on transformers."""
    from transformers import BertModel, BertTokenizer

    tok = BertTokenizer(vocab_path)
    sd = {k[len("module."):]: v for k, v in sd.items()}
    hidden = sd["bert.embeddings.word_embeddings.weight"].shape[1]
    vocab_size = sd["bert.embeddings.word_embeddings.weight"].shape[0]
    bert = BertModel(tiny_bert_config(vocab_size)).eval()
    bert.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("bert.") and "position_ids" not in k})
    heads = torch.nn.ModuleList(torch.nn.Linear(hidden, 2 if i == 13 else 4) for i in range(14))
    heads.load_state_dict({k[len("linear_heads."):]: v for k, v in sd.items() if k.startswith("linear_heads.")})
    encoded = []
    for r in texts:
        r = re.sub(r"\s+", " ", r.strip().replace("\n", " "))
        tokens = tok.tokenize(r)
        if tokens:
            res = tok.encode_plus(tokens)["input_ids"]
            if len(res) > 512:
                res = res[:511] + [tok.sep_token_id]
        else:
            res = [tok.cls_token_id, tok.sep_token_id]
        encoded.append(torch.tensor(res))
    out = []
    with torch.no_grad():
        for i in range(0, len(encoded), 128):
            batch = encoded[i : i + 128]
            ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=0)
            mask = torch.zeros(ids.shape, dtype=torch.float)
            for j, t in enumerate(batch):
                mask[j, : len(t)] = 1
            cls = bert(ids, attention_mask=mask)[0][:, 0, :]
            out.append(torch.stack([h(cls).argmax(dim=1) for h in heads], dim=1))
    return torch.cat(out).numpy()


def official_scores(preds: list[str], refs: list[str], labels: np.ndarray | None, n_resamples: int = 500) -> dict:
    """The figures of the official `run.py` in bootstrap mode: {column: {median, ci_l, ci_h}} plus
    "breakdown-" / "breakdown+" classification reports. `labels`: CheXbert labels of preds + refs."""
    from rouge_score import rouge_scorer, scoring
    from sacrebleu.metrics import BLEU
    from scipy.stats import bootstrap
    from sklearn.metrics import classification_report, precision_recall_fscore_support

    out = {}
    for name, order in (("BLEU-1", 1), ("BLEU-4", 4)):
        ret = BLEU(max_ngram_order=order).corpus_score(hypotheses=preds, references=[refs], n_bootstrap=n_resamples)
        out[name] = {"median": ret.score, "ci_l": ret._mean - ret._ci, "ci_h": ret._mean + ret._ci}
    for name, key in (("ROUGE-L", "rougeL"), ("ROUGE-2", "rouge2")):
        np.random.seed(3)
        scorer = rouge_scorer.RougeScorer(rouge_types=[key], use_stemmer=False)
        agg = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=n_resamples)
        for ref, pred in zip(refs, preds):
            agg.add_scores(scorer.score(ref, pred))
        r = agg.aggregate()[key]
        out[name] = {"median": r.mid.fmeasure, "ci_l": r.low.fmeasure, "ci_h": r.high.fmeasure}
    if labels is None:
        return out
    n = len(preds)
    five = [1, 4, 5, 7, 9]  # Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion in head order
    for plus, positive in (("", (1,)), ("+", (1, 3))):
        binary = np.isin(labels, positive).astype(int).tolist()
        for suffix, cols in (("14", list(range(14))), ("5", five)):
            y_pred = [[row[c] for c in cols] for row in binary[:n]]
            y_true = [[row[c] for c in cols] for row in binary[n:]]
            cr = classification_report(y_true, y_pred, target_names=[CHEXBERT_CONDITIONS[c] for c in cols], output_dict=True, zero_division=0)
            if suffix == "14":
                out["breakdown" + (plus or "-")] = cr
            for key in ("micro", "macro"):
                def stat(indices):
                    p, r = [y_pred[i] for i in indices], [y_true[i] for i in indices]
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return precision_recall_fscore_support(y_pred=p, y_true=r, average=key)[2]

                bs = bootstrap(data=(list(range(n)),), statistic=stat, method="percentile", paired=False,
                               vectorized=False, confidence_level=0.95, random_state=3, n_resamples=n_resamples)
                out[f"{key.capitalize()}-F1-{suffix}{plus}"] = {
                    "median": np.median(bs.bootstrap_distribution),
                    "ci_l": bs.confidence_interval.low, "ci_h": bs.confidence_interval.high,
                    "value": cr[f"{key} avg"]["f1-score"],
                }
    return out
