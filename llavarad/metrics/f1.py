"""Multi-label precision / recall / F1 with scikit-learn's semantics (zero_division=0).

The official script scores CheXbert labels with `classification_report(refs, preds,
output_dict=True, zero_division=0)` and bootstraps `precision_recall_fscore_support(average=...)`.
Per condition: precision tp/(tp+fp), recall tp/(tp+fn), F1 2tp/(2tp+fp+fn), each 0 when its
denominator is 0. Micro pools the counts of all conditions; macro is the plain mean over
conditions, a condition absent from both sides counting as F1 0. Support = reference positives.
"""

import numpy as np

from llavarad.metrics.bootstrap import summarize


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _prf(tp: np.ndarray, true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 from counts of true positives, reference and predicted positives."""
    return _ratio(tp, pred), _ratio(tp, true), _ratio(2 * tp, true + pred)


def _counts(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """weights (..., n) @ (n, L) -> tp, reference positives, predicted positives, each (..., L)."""
    return weights @ (y_true * y_pred), weights @ y_true, weights @ y_pred


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    """y_true, y_pred: (n, L) 0/1. {name | "micro avg" | "macro avg": {precision, recall, f1-score, support}}."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    tp, true, pred = _counts(y_true, y_pred, np.ones(len(y_true)))
    p, r, f = _prf(tp, true, pred)
    report = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1-score": float(f[i]), "support": int(true[i])}
        for i, name in enumerate(names)
    }
    mp, mr, mf = _prf(tp.sum(), true.sum(), pred.sum())
    support = int(true.sum())
    report["micro avg"] = {"precision": float(mp), "recall": float(mr), "f1-score": float(mf), "support": support}
    report["macro avg"] = {"precision": float(p.mean()), "recall": float(r.mean()), "f1-score": float(f.mean()), "support": support}
    return report


def f1_with_ci(y_true: np.ndarray, y_pred: np.ndarray, names: list[str], counts: np.ndarray | None) -> dict:
    """Micro and macro F1, and each label's precision / recall / F1, as `summarize` figures: the
    full-data value, and with `counts` (B, n) the bootstrap median and percentile CI."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    tp, true, pred = _counts(y_true, y_pred, np.ones(len(y_true)))
    full = _prf(tp, true, pred)  # (precision, recall, F1), each (L,)
    values = {"micro": _prf(tp.sum(), true.sum(), pred.sum())[2], "macro": full[2].mean()}
    samples = dict.fromkeys(values)
    per_label = (None, None, None)
    if counts is not None:
        tp_b, true_b, pred_b = _counts(y_true, y_pred, counts)  # (B, L)
        per_label = _prf(tp_b, true_b, pred_b)
        samples = {"micro": _prf(tp_b.sum(1), true_b.sum(1), pred_b.sum(1))[2], "macro": per_label[2].mean(1)}
    out = {k: summarize(values[k], samples[k]) for k in values}
    out["labels"] = {
        name: {
            metric: summarize(full[j][i], None if counts is None else per_label[j][:, i])
            for j, metric in enumerate(("precision", "recall", "f1-score"))
        }
        for i, name in enumerate(names)
    }
    return out
