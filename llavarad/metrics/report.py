"""Write evaluation results: the official CSVs, metrics.json, per_report.jsonl, a table on stdout.

`main.csv`, `breakdown_p.csv` and `breakdown_n.csv` have the rows and columns the official
`rrg_eval/run.py` writes through pandas (numbers as Python's repr, supports as floats, as pandas
writes them), so existing analysis scripts read ours unchanged. The official "median" row is the
bootstrap median, except for BLEU where sacrebleu's full-data score stands there; metrics.json keeps
the full-data value of every metric next to it.
"""

import json
import os

from llavarad.metrics.chexbert import CONDITIONS
from llavarad.metrics.chexprompt import METRICS as CHEXPROMPT_METRICS

BREAKDOWN_ROWS = sorted(CONDITIONS) + ["micro avg", "macro avg"]
BREAKDOWN_COLUMNS = ["f1-score", "precision", "recall", "support"]
BREAKDOWN_FILES = {"breakdown_p.csv": "uncertain_as_positive", "breakdown_n.csv": "uncertain_as_negative"}
# The paper's order, used for the table on stdout.
DISPLAY_ORDER = [
    "Micro-F1-14", "Micro-F1-5", "Macro-F1-14", "Macro-F1-5",
    "Micro-F1-14+", "Micro-F1-5+", "Macro-F1-14+", "Macro-F1-5+",
    "F1-RadGraph", "BLEU-1", "BLEU-4", "ROUGE-L", "ROUGE-2", *CHEXPROMPT_METRICS,
]


def _csv(rows: list[list]) -> str:
    return "".join(",".join(x if isinstance(x, str) else repr(float(x)) for x in row) + "\n" for row in rows)


def main_csv(metrics: dict) -> str:
    """Columns = metrics; rows median, ci_l, ci_h (or one "value" row when not bootstrapped)."""
    names = list(metrics)
    rows = ["median", "ci_l", "ci_h"] if all("median" in m for m in metrics.values()) else ["value"]
    return _csv([[""] + names] + [[r] + [metrics[k][r] for k in names] for r in rows])


def breakdown_csv(breakdown: dict) -> str:
    return _csv([[""] + BREAKDOWN_COLUMNS] + [[r] + [breakdown[r][c] for c in BREAKDOWN_COLUMNS] for r in BREAKDOWN_ROWS])


def write_outputs(output_dir: str, results: dict, header: dict, per_report_base: list[dict]) -> None:
    """metrics.json = header (input, record counts, bootstrap settings) + results; the CSVs; one
    JSON line per report with its text, its failure flag and its scores."""
    os.makedirs(output_dir, exist_ok=True)
    summary = {**header, **{k: results[k] for k in ("metrics", "breakdown", "skipped")}}
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    with open(os.path.join(output_dir, "main.csv"), "w", encoding="utf-8") as f:
        f.write(main_csv(results["metrics"]))
    for name, mapping in BREAKDOWN_FILES.items():
        if mapping in results["breakdown"]:
            with open(os.path.join(output_dir, name), "w", encoding="utf-8") as f:
                f.write(breakdown_csv(results["breakdown"][mapping]))
    with open(os.path.join(output_dir, "per_report.jsonl"), "w", encoding="utf-8") as f:
        for base, scores in zip(per_report_base, results["per_report"]):
            f.write(json.dumps({**base, **scores}, ensure_ascii=False) + "\n")


def format_table(results: dict, header: dict) -> str:
    """A readable summary: every metric with its value and CI, the skipped ones, the breakdowns."""
    records = header["records"]
    lines = [f"Reports scored: {records['scored']}"]
    if records["failed"]:
        lines.append(f"Failed records (error field or no prediction): {records['failed']}, {records['failed_handling']}")
    if "chexprompt" in records:
        lines.append(chexprompt_line(records["chexprompt"]))
    w = max([14] + [len(name) + 2 for name in results["metrics"]])
    lines += ["", f"{'metric':<{w}}{'value':>9}{'median':>9}   95% CI"]
    for name in DISPLAY_ORDER:
        if name in results["metrics"]:
            m = results["metrics"][name]
            ci = f"   [{m['ci_l']:.4f}, {m['ci_h']:.4f}]" if "ci_l" in m else ""
            median = f"{m['median']:>9.4f}" if "median" in m else " " * 9
            lines.append(f"{name:<{w}}{m['value']:>9.4f}{median}{ci}")
    for name, reason in results["skipped"].items():
        lines.append(f"{name:<{w}}{reason}")
    for title, mapping in (("uncertain as positive", "uncertain_as_positive"), ("uncertain as negative", "uncertain_as_negative")):
        if mapping in results["breakdown"]:
            lines += ["", f"CheXbert F1 ({title})", f"{'':<28}" + "".join(f"{c:>11}" for c in BREAKDOWN_COLUMNS)]
            for r in BREAKDOWN_ROWS:
                row = results["breakdown"][mapping][r]
                lines.append(f"{r:<28}" + "".join(f"{row[c]:>11.4f}" for c in BREAKDOWN_COLUMNS[:3]) + f"{row['support']:>11d}")
    return "\n".join(lines)


def chexprompt_line(c: dict) -> str:
    """How many reports the judge rated, which failed, what a report cost."""
    ids = lambda xs: ", ".join(map(str, xs[:10])) + (" ..." if len(xs) > 10 else "")
    total = c["rated"] + c["failed"] + c["off_form"]
    line = (f"CheXprompt ({c['judge']['model']}): {c['rated']} of {total} reports rated ({c['reused']} ratings reused from "
            f"{c['file']}); {c['tokens_per_report']['prompt_tokens']:.0f} prompt + "
            f"{c['tokens_per_report']['completion_tokens']:.0f} completion tokens per report")
    if c["failed"]:
        line += f"\n  {c['failed']} ratings failed, left out of the means: {ids(c['failed_ids'])} ({'; '.join(c['failed_errors'])})"
    if c["off_form"]:
        line += f"\n  {c['off_form']} answers parsed without the six error types, left out: {ids(c['off_form_ids'])}"
    return line
