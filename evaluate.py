"""Score generated reports as the official LLaVA-Rad evaluation does.

    python evaluate.py preds.jsonl
    python evaluate.py preds.jsonl --chexbert chexbert.pth --bert-vocab vocab.txt --output-dir results/
    python evaluate.py preds.jsonl --chexbert auto --radgraph auto    # downloads the official scorers
"""

import argparse
import os
import sys

from llavarad.metrics.inputs import read_predictions
from llavarad.metrics.report import format_table, write_outputs
from llavarad.metrics.scorers import resolve_auto
from llavarad.metrics.suite import evaluate_reports


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", help="JSONL with 'prediction' and 'reference' per line (infer.py output)")
    p.add_argument("--output-dir", default="eval_results", help="where metrics.json, main.csv, ... go")
    p.add_argument("--chexbert", help="chexbert.pth (StanfordAIMI/RRG_scorers), or auto: download it (needs the hub extra); "
                                      "CheXbert F1 is skipped without it")
    p.add_argument("--bert-vocab", help="bert-base-uncased vocab.txt for CheXbert, or auto "
                                        "(default: vocab.txt beside --chexbert; auto with --chexbert auto)")
    p.add_argument("--radgraph", help="RadGraph model archive radgraph.tar.gz, or auto: download it (needs the hub extra); "
                                      "F1-RadGraph is skipped without it")
    p.add_argument("--radgraph-vocab", help="the vocab.txt of the BERT named in the archive's config.json, or auto "
                                            "(needed with --radgraph; auto with --radgraph auto)")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the 95%% CIs; 0: no CIs")
    p.add_argument("--seed", type=int, default=3, help="bootstrap seed (official: 3; BLEU keeps sacrebleu's)")
    p.add_argument("--cache", help="directory keeping CheXbert / RadGraph labels per text across runs")
    p.add_argument("--device", help="torch device for the labelers (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=128, help="texts per labeler batch")
    p.add_argument("--skip-errors", action="store_true", help="drop failed records instead of scoring them as empty")
    return p.parse_args(argv)


def check_files(args: argparse.Namespace) -> None:
    """Every weight file is found (or downloaded, for "auto") before any work starts."""
    args.chexbert, args.bert_vocab, args.radgraph, args.radgraph_vocab = resolve_auto(
        args.chexbert, args.bert_vocab, args.radgraph, args.radgraph_vocab)
    if args.chexbert and not args.bert_vocab:
        beside = os.path.join(os.path.dirname(args.chexbert), "vocab.txt")
        if not os.path.exists(beside):
            raise ValueError(f"--chexbert needs --bert-vocab (bert-base-uncased vocab.txt, or auto); none at {beside}")
        args.bert_vocab = beside
    if args.radgraph and not args.radgraph_vocab:
        raise ValueError("--radgraph needs --radgraph-vocab (the vocab.txt of the RadGraph BERT, or auto)")
    for flag in ("chexbert", "bert_vocab", "radgraph", "radgraph_vocab"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{path}: file given to --{flag.replace('_', '-')} not found")
    if args.bootstrap < 0:
        raise ValueError("--bootstrap must be 0 (no CIs) or a number of resamples")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_files(args)
        data = read_predictions(args.predictions, args.skip_errors)
        if data.failed_lines:
            action = "dropped (--skip-errors)" if data.dropped else "scored as empty predictions"
            print(f"warning: {len(data.failed_lines)} records failed (error field or no prediction), {action}; "
                  f"lines {', '.join(map(str, data.failed_lines[:10]))}{' ...' if len(data.failed_lines) > 10 else ''}",
                  file=sys.stderr)
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        results = evaluate_reports(
            data.predictions, data.references,
            chexbert=args.chexbert, bert_vocab=args.bert_vocab,
            radgraph=args.radgraph, radgraph_vocab=args.radgraph_vocab,
            device=args.device, batch_size=args.batch_size, cache_dir=args.cache,
            n_resamples=args.bootstrap, seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    header = {
        "input": os.path.abspath(args.predictions),
        "records": {
            "scored": len(data.predictions),
            "failed": len(data.failed_lines),
            "failed_lines": data.failed_lines,
            "failed_handling": "dropped" if data.dropped else "scored as empty predictions",
        },
        "bootstrap": {
            "resamples": args.bootstrap, "seed": args.seed, "confidence": 0.95,
            "method": "percentile; BLEU: sacrebleu's (seed 12345, mean +- half the 2.5-97.5% range)",
        },
    }
    base = [
        {"line": n, "id": i, "prediction": p, "reference": r, "failed": f}
        for n, i, p, r, f in zip(data.lines, data.ids, data.predictions, data.references, data.failed)
    ]
    write_outputs(args.output_dir, results, header, base)
    print(format_table(results, header))
    breakdowns = " and breakdown_p.csv, breakdown_n.csv" if results["breakdown"] else ""  # CheXbert's, when it ran
    print(f"\nWrote metrics.json, main.csv, per_report.jsonl{breakdowns} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
