"""CheXbert: BERT + 14 linear heads that label a report for 14 chest X-ray conditions.

Loads the public `chexbert.pth` (`{"model_state_dict": {"module.bert.*", "module.linear_heads.*"}}`,
saved from DataParallel) and labels texts as the official LLaVA-Rad evaluation does: whitespace
collapsed, WordPiece ids wrapped in [CLS] ... [SEP] and cut to 512, the [CLS] state fed to every
head, argmax. Heads 0-12 give blank / positive / negative / uncertain, "No Finding" blank / positive.
"""

import re

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from llavarad.metrics.bert import Bert, load_bert, pad_batch
from llavarad.metrics.cache import file_fingerprint, load_cache, save_cache
from llavarad.metrics.wordpiece import WordPiece

CONDITIONS = [  # head order
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices", "No Finding",
]
CONDITIONS_5 = ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
POSITIVE, UNCERTAIN = 1, 3  # CheXbert's classes: 0 blank, 1 positive, 2 negative, 3 uncertain
LABEL_NAMES = ("blank", "positive", "negative", "uncertain")


class CheXbert(nn.Module):
    def __init__(self, bert: Bert, heads: nn.ModuleList):
        super().__init__()
        self.bert = bert
        self.linear_heads = heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, 14) class index per condition."""
        cls = self.bert(input_ids, attention_mask)[:, 0]  # (B, H); dropout is off at inference
        return torch.stack([head(cls).argmax(-1) for head in self.linear_heads], dim=1)


def load_chexbert(path: str) -> CheXbert:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: CheXbert checkpoint not found") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a CheXbert checkpoint ({type(e).__name__}: {e})") from None
    sd = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(("module.bert.", "bert.")) for k in sd):
        raise ValueError(f"{path}: not a CheXbert checkpoint (no model_state_dict with bert.* keys)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # saved from DataParallel
    try:
        bert = load_bert(sd, "bert.")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    hidden = bert.cfg.hidden
    heads = nn.ModuleList(nn.Linear(hidden, 2 if i == 13 else 4) for i in range(14))
    head_sd = {k.removeprefix("linear_heads."): v for k, v in sd.items() if k.startswith("linear_heads.")}
    expected = heads.state_dict()
    other = [k for k in sd if not k.startswith(("bert.", "linear_heads."))]
    missing = [k for k in expected if k not in head_sd]
    unknown = [k for k in head_sd if k not in expected]
    if other or missing or unknown:
        names = other + [f"linear_heads.{k}" for k in missing + unknown]
        raise ValueError(f"{path}: CheXbert checkpoint has missing or unknown keys: {', '.join(names[:5])}")
    for k, v in expected.items():
        if head_sd[k].shape != v.shape:
            raise ValueError(f"{path}: linear_heads.{k} has shape {tuple(head_sd[k].shape)}, expected {tuple(v.shape)}")
    heads.load_state_dict(head_sd)
    return CheXbert(bert, heads).eval()


def clean(text: str) -> str:
    """The official preprocessing: strip, newlines to spaces, whitespace runs to one space."""
    return re.sub(r"\s+", " ", text.strip().replace("\n", " "))


@torch.inference_mode()
def label(model: CheXbert, ids: list[list[int]], device: str, batch_size: int = 128) -> np.ndarray:
    """Token-id lists -> (n, 14) labels. Texts are batched by length; padding is masked out, so a
    text's labels do not depend on its batch."""
    out = np.zeros((len(ids), len(CONDITIONS)), dtype=np.int64)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="CheXbert", unit="batch", disable=None):
        input_ids, mask = pad_batch([ids[i] for i in batch])
        out[batch] = model(input_ids.to(device), mask.to(device)).cpu().numpy()
    return out


def chexbert_labels(
    texts: list[str], checkpoint: str, vocab: str, device: str, batch_size: int = 128, cache: str | None = None
) -> np.ndarray:
    """(len(texts), 14) CheXbert labels (0 blank, 1 positive, 2 negative, 3 uncertain).

    Each distinct text is labelled once; with `cache` (a JSON file) labels persist across runs,
    filed under the checkpoint's and vocab's fingerprint, and only unseen texts go through BERT.
    """
    tokenizer = WordPiece(vocab)
    fingerprint = file_fingerprint(checkpoint, vocab) if cache else ""
    known = load_cache(cache, fingerprint)
    cleaned = [clean(t) for t in texts]
    new = sorted({t for t in cleaned if t not in known})
    if new:
        model = load_chexbert(checkpoint).to(device)
        labels = label(model, [tokenizer.encode(t) for t in new], device, batch_size)
        known.update(zip(new, labels.tolist()))
        save_cache(cache, fingerprint, known)
    return np.array([known[t] for t in cleaned], dtype=np.int64).reshape(len(texts), len(CONDITIONS))


def binarize(labels: np.ndarray, uncertain_positive: bool) -> np.ndarray:
    """Positive -> 1, else 0; with `uncertain_positive` (the "+" metrics) uncertain -> 1 as well."""
    positive = labels == POSITIVE
    if uncertain_positive:
        positive |= labels == UNCERTAIN
    return positive.astype(np.int64)
