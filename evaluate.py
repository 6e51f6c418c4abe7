"""Score generated reports as the official LLaVA-Rad evaluation does.

    python evaluate.py preds.jsonl
    python evaluate.py preds.jsonl --chexbert chexbert.pth --bert-vocab vocab.txt --output-dir results/
    python evaluate.py preds.jsonl --chexbert auto --radgraph auto    # downloads the official scorers
    python evaluate.py preds.jsonl --chexprompt gpt-4-1106-preview    # a GPT-4 judge: the reports leave this machine
    python evaluate.py preds.jsonl --chexprompt llama-3-70b --judge-url http://127.0.0.1:8001/v1   # a local judge
"""

import argparse
import os
import sys

from llavarad.metrics.chexprompt import SAMPLING, usable
from llavarad.metrics.inputs import read_predictions
from llavarad.metrics.judge import JudgeSettings, JudgeStopped, RatingRun, rate_reports
from llavarad.metrics.ratings import FILE as RATINGS_FILE
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
    j = p.add_argument_group("CheXprompt (a chat model counts each report's errors; the reports are sent to it)")
    j.add_argument("--chexprompt", metavar="MODEL", help="the judge model (Azure: the deployment name); the key comes from "
                                                         "OPENAI_API_KEY (Azure: AZURE_OPENAI_API_KEY too)")
    j.add_argument("--judge-url", help="OpenAI-compatible base URL (default: OpenAI's), e.g. http://127.0.0.1:8001/v1 for a "
                                       "local vLLM / llama.cpp / Ollama, or an Azure OpenAI endpoint with --judge-api-version")
    j.add_argument("--judge-api-version", help="Azure OpenAI API version, e.g. 2024-06-01: --judge-url is an Azure endpoint")
    j.add_argument("--judge-temperature", type=float, default=SAMPLING["temperature"], help="(default: %(default)s, official)")
    j.add_argument("--judge-top-p", type=float, default=SAMPLING["top_p"], help="(default: %(default)s, official)")
    j.add_argument("--judge-max-tokens", type=int, default=SAMPLING["max_tokens"], help="(default: %(default)s, official)")
    j.add_argument("--judge-retries", type=int, default=JudgeSettings.retries, help="asks again after an answer the official parser cannot "
                                                               "read, then the rating fails (default: %(default)s, official)")
    j.add_argument("--judge-concurrency", type=int, default=JudgeSettings.concurrency, help="requests in flight (default: %(default)s)")
    j.add_argument("--judge-rpm", type=float, default=JudgeSettings.rpm, help="requests per minute at most; 0: no limit (default: %(default)s, official)")
    j.add_argument("--judge-timeout", type=float, default=JudgeSettings.timeout, help="seconds to wait for one answer (default: %(default)s)")
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


def judge_settings(args: argparse.Namespace) -> JudgeSettings | None:
    """The judge of --chexprompt (None without it), its options checked before anything runs."""
    if args.chexprompt is None:
        return None
    if args.judge_api_version and not args.judge_url:
        raise ValueError("--judge-api-version needs --judge-url, the Azure OpenAI endpoint (https://RESOURCE.openai.azure.com)")
    if args.judge_url and ".openai.azure.com" in args.judge_url and not args.judge_api_version:
        raise ValueError(f"--judge-url {args.judge_url} is an Azure OpenAI endpoint: give --judge-api-version (e.g. 2024-06-01)")
    if args.judge_concurrency < 1 or args.judge_max_tokens < 1 or args.judge_retries < 0 or args.judge_rpm < 0 or args.judge_timeout <= 0:
        raise ValueError("--judge-concurrency and --judge-max-tokens must be at least 1, --judge-retries and --judge-rpm "
                         "at least 0, --judge-timeout above 0")
    return JudgeSettings(
        args.chexprompt, args.judge_url, args.judge_api_version, args.judge_temperature, args.judge_top_p,
        args.judge_max_tokens, args.judge_retries, args.judge_concurrency, args.judge_rpm, args.judge_timeout)


def chexprompt_records(run: RatingRun, settings: JudgeSettings) -> dict:
    """metrics.json's account of the ratings: how many, which failed and why, what they cost."""
    failed = [x for x in run.lines if x["rating"] is None]
    off_form = [x for x in run.lines if x["rating"] is not None and not usable(x["rating"])]
    usage = {k: sum(x["usage"][k] for x in run.lines) for k in ("requests", "prompt_tokens", "completion_tokens")}
    return {
        "judge": settings.fingerprint(), "sent_to": run.host, "file": RATINGS_FILE,
        "rated": len(run.lines) - len(failed) - len(off_form), "failed": len(failed),
        "failed_ids": [x["id"] for x in failed], "failed_errors": sorted({x["error"] for x in failed}),
        "off_form": len(off_form), "off_form_ids": [x["id"] for x in off_form],
        "asked": run.asked, "reused": run.reused, "requests_this_run": run.requests,
        "usage": usage, "tokens_per_report": {k: usage[k] / len(run.lines) for k in ("prompt_tokens", "completion_tokens")},
    }


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
        settings = judge_settings(args)
        run = None
        if settings:  # first: a judge that refuses the key stops the run before the local metrics
            ids = [i if i is not None else n for i, n in zip(data.ids, data.lines)]  # no id: the line number
            run = rate_reports(ids, data.references, data.predictions, settings, args.output_dir)
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        results = evaluate_reports(
            data.predictions, data.references,
            chexbert=args.chexbert, bert_vocab=args.bert_vocab,
            radgraph=args.radgraph, radgraph_vocab=args.radgraph_vocab,
            device=args.device, batch_size=args.batch_size, cache_dir=args.cache,
            n_resamples=args.bootstrap, seed=args.seed,
            chexprompt=None if run is None else [x["rating"] for x in run.lines],
        )
    except (ValueError, FileNotFoundError, JudgeStopped) as e:
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
    if run is not None:
        header["records"]["chexprompt"] = chexprompt_records(run, settings)
    base = [
        {"line": n, "id": i, "prediction": p, "reference": r, "failed": f}
        for n, i, p, r, f in zip(data.lines, data.ids, data.predictions, data.references, data.failed)
    ]
    write_outputs(args.output_dir, results, header, base)
    print(format_table(results, header))
    breakdowns = " and breakdown_p.csv, breakdown_n.csv" if results["breakdown"] else ""  # CheXbert's, when it ran
    ratings = f", {RATINGS_FILE}" if run else ""
    print(f"\nWrote metrics.json, main.csv, per_report.jsonl{breakdowns}{ratings} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
