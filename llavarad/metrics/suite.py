"""All report-generation metrics of the official LLaVA-Rad evaluation, on one predictions list.

Every per-report metric and CheXbert F1 is bootstrapped over one shared draw of report indices
(bootstrap.py), BLEU over sacrebleu's own (bleu.py). A metric whose weights were not given is
skipped with the reason, never silently. CheXprompt's ratings come in made (judge.py): here they
are summed up, over the reports whose rating is usable.
"""

from llavarad.metrics.bleu import bleu_with_ci
from llavarad.metrics.bootstrap import mean_with_ci, resample_counts, resample_indices
from llavarad.metrics.chexbert import CONDITIONS, CONDITIONS_5, LABEL_NAMES, binarize, chexbert_labels
from llavarad.metrics.chexprompt import METRICS as CHEXPROMPT_METRICS
from llavarad.metrics.chexprompt import report_scores, summarize, usable
from llavarad.metrics.f1 import classification_report, f1_with_ci
from llavarad.metrics.rouge import rouge_l, rouge_n

# The official main.csv column order (ROUGE-2 where its scorer list puts it, after ROUGE-L).
MAIN_COLUMNS = [
    "BLEU-1", "BLEU-4", "ROUGE-L", "ROUGE-2",
    "Micro-F1-14", "Macro-F1-14", "Micro-F1-5", "Macro-F1-5",
    "Micro-F1-14+", "Macro-F1-14+", "Micro-F1-5+", "Macro-F1-5+",
    "F1-RadGraph",
]
CHEXBERT_SKIPPED = "skipped: pass --chexbert auto, or --chexbert chexbert.pth --bert-vocab vocab.txt (bert-base-uncased), to score it"
RADGRAPH_SKIPPED = "skipped: pass --radgraph auto, or --radgraph radgraph.tar.gz --radgraph-vocab vocab.txt, to score it"


def evaluate_reports(
    predictions: list[str],
    references: list[str],
    *,
    chexbert: str | None = None,
    bert_vocab: str | None = None,
    radgraph: str | None = None,
    radgraph_vocab: str | None = None,
    device: str = "cpu",
    batch_size: int = 128,
    cache_dir: str | None = None,
    n_resamples: int = 500,
    seed: int = 3,
    chexprompt: list[dict | None] | None = None,
) -> dict:
    """{"metrics": {name: {value, median, ci_l, ci_h}}, "breakdown": {mapping: {condition: ...}},
    "per_report": [{...}], "skipped": {name: reason}}; see report.py for how each is written."""
    n = len(predictions)
    counts = resample_counts(resample_indices(n, n_resamples, seed), n) if n_resamples > 0 else None
    metrics, skipped, breakdown = {}, {}, {}
    per_report = [{} for _ in range(n)]

    for name, order in (("BLEU-1", 1), ("BLEU-4", 4)):
        metrics[name] = bleu_with_ci(predictions, references, order, n_resamples)
    for name, scorer in (("ROUGE-L", rouge_l), ("ROUGE-2", lambda r, p: rouge_n(r, p, 2))):
        scores = [scorer(r, p) for p, r in zip(predictions, references)]
        metrics[name] = mean_with_ci(scores, counts)
        for row, s in zip(per_report, scores):
            row[name] = s

    if chexbert is None:
        skipped["CheXbert"] = CHEXBERT_SKIPPED
    else:
        cache = None if cache_dir is None else f"{cache_dir}/chexbert.json"
        labels = chexbert_labels(predictions + references, chexbert, bert_vocab, device, batch_size, cache)
        pred_labels, ref_labels = labels[:n], labels[n:]
        five = [CONDITIONS.index(c) for c in CONDITIONS_5]
        for plus, mapping in (("", "uncertain_as_negative"), ("+", "uncertain_as_positive")):
            y_pred = binarize(pred_labels, uncertain_positive=bool(plus))
            y_true = binarize(ref_labels, uncertain_positive=bool(plus))
            f14 = f1_with_ci(y_true, y_pred, CONDITIONS, counts)
            f5 = f1_with_ci(y_true[:, five], y_pred[:, five], CONDITIONS_5, counts)
            for avg in ("micro", "macro"):
                metrics[f"{avg.capitalize()}-F1-14{plus}"] = f14[avg]
                metrics[f"{avg.capitalize()}-F1-5{plus}"] = f5[avg]
            report = classification_report(y_true, y_pred, CONDITIONS)
            for cond in CONDITIONS:  # per-condition CIs for metrics.json; the CSVs keep the official columns
                report[cond]["ci"] = {k: [v["ci_l"], v["ci_h"]] for k, v in f14["labels"][cond].items() if "ci_l" in v}
            breakdown[mapping] = report
        plain_true, plain_pred = binarize(ref_labels, False), binarize(pred_labels, False)
        for i, row in enumerate(per_report):
            row["chexbert_prediction"] = {c: LABEL_NAMES[v] for c, v in zip(CONDITIONS, pred_labels[i]) if v}
            row["chexbert_reference"] = {c: LABEL_NAMES[v] for c, v in zip(CONDITIONS, ref_labels[i]) if v}
            row["chexbert_disagree"] = [c for j, c in enumerate(CONDITIONS) if plain_true[i, j] != plain_pred[i, j]]

    if radgraph is None:
        skipped["F1-RadGraph"] = RADGRAPH_SKIPPED
    else:
        from llavarad.metrics.radgraph import radgraph_rewards  # only when asked for: its own weights

        cache = None if cache_dir is None else f"{cache_dir}/radgraph.json"
        rewards = radgraph_rewards(predictions, references, radgraph, radgraph_vocab, device, batch_size, cache)
        metrics["F1-RadGraph"] = mean_with_ci(rewards, counts)
        for row, r in zip(per_report, rewards):
            row["F1-RadGraph"] = float(r)

    if chexprompt is not None:
        summary = summarize(chexprompt, n_resamples, seed)
        if summary:
            metrics.update(summary)
        else:
            skipped["CheXprompt"] = "no usable rating: chexprompt.jsonl has each report's error; a rerun asks again"
        for row, rating in zip(per_report, chexprompt):
            row["chexprompt"] = rating
            if usable(rating):
                scores = report_scores(rating)
                for name in ("CheXprompt-significant", "CheXprompt-insignificant"):
                    row[name] = scores[name]

    ordered = {k: metrics[k] for k in MAIN_COLUMNS + CHEXPROMPT_METRICS if k in metrics}
    return {"metrics": ordered, "breakdown": breakdown, "per_report": per_report, "skipped": skipped}

