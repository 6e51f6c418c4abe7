"""Write the Findings section for chest X-rays: one image, or every query of a query file.

    python infer.py chest.png [--reason "..."] [--model DIR_OR_REPO] [--base DIR_OR_REPO] [--explain DIR] [--quantize int8|int4]
    python infer.py --query-file QUERIES --image-folder DIR --output preds.jsonl [--loader L] [--batch-size 32]
    python infer.py --query-file OPENI_DIR --loader openi --output openi.jsonl      # the paper's external test sets
    python infer.py --query-file df_chexpert_plus_240401.csv --loader chexpert_plus --image-folder PNG --output chexpert.jsonl
    torchrun --nproc_per_node=8 infer.py --query-file QUERIES --image-folder DIR --output preds.jsonl

One image: stdout carries only the findings text. A query file (the PhysioNet LLaVA-Rad annotation
JSON or a JSONL of {"id", "image", "reason"?, "reference"?}): one JSON line per query in --output
({"id", "query", "reference", "prediction"}, or "error" for an unreadable image or a prompt over
the decoder's context), appended as reports finish; rerunning the same command skips the ids
already predicted. Logs go to stderr.
--explain DIR also writes, per report, one heatmap overlay per sentence and a JSON of the maps.

Exit codes: 0 done; 1 bad input (one "error: ..." line); 2 bad arguments; 3 (query file) the run
finished but some records failed: their "error" records are in --output, a rerun retries them.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

from llavarad.dist import barrier, close_distributed, init_distributed, print0, sum_across_ranks
from llavarad.errors import lone_surrogate
from llavarad.explain.relevance import explain, explain_predictions, file_stem, gradient_problem, make_folder, write_explanation
from llavarad.infer.batch import output_problem, predicted_ids, read_results, run_queries
from llavarad.infer.images import load_image
from llavarad.infer.pipeline import describe, device_problem, load
from llavarad.infer.records import LOADERS, load_records
from llavarad.infer.testsets import DEFAULT_SPLIT, TEST_SETS, load_test_set
from llavarad.model.config import DTYPES, TOWER_CKPT, TOWER_JSON
from llavarad.model.quant import MODES

FAILED_RECORDS = 3  # exit code of a batch run that wrote an error record for some query


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", help="one chest X-ray: PNG, JPEG, DICOM (.dcm) or any image PIL reads")
    p.add_argument("--reason", help="reason for exam (indication); omitted -> the no-reason prompt")
    p.add_argument("--model", default="microsoft/llava-rad", help="release or export folder, or Hugging Face repo id (default: %(default)s)")
    p.add_argument("--base", default="lmsys/vicuna-7b-v1.5", help="base Llama folder or Hugging Face repo id (default: %(default)s)")
    p.add_argument("--tower", help=f"folder with the tower files ({TOWER_JSON}, {TOWER_CKPT}), looked in after the "
                                   "release folder and the paths its config.json gives (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="most tokens per report; the prompt plus these must fit the decoder's context (default: %(default)s)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, this rank's GPU under torchrun, when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="(default: an export's own; else bfloat16 on GPU or with --quantize, float32 on CPU)")
    p.add_argument("--quantize", choices=MODES, help="decoder linear layers in 8 or 4 bits, quantized while loading "
                   "(--dtype stays the dtype of the activations and of the other weights; default: none)")
    p.add_argument("--explain", metavar="DIR", help="write per-sentence heatmaps over the image (PNG) and their grids (JSON) to DIR")
    q = p.add_argument_group("query file")
    q.add_argument("--query-file", help="annotation JSON or JSONL; switches to batch mode")
    q.add_argument("--image-folder", help="root of the records' image paths (default: the query file's folder)")
    q.add_argument("--loader", choices=LOADERS + TEST_SETS, default="default",
                   help="record filter and prompt; openi (--query-file: the folder of the report XMLs or of indiana_reports.csv) "
                        "and chexpert_plus (df_chexpert_plus_240401.csv): frontal images with findings (default: %(default)s)")
    q.add_argument("--split", help=f"the split of --loader chexpert_plus (default: {DEFAULT_SPLIT})")
    q.add_argument("--output", help="predictions JSONL (required with --query-file)")
    q.add_argument("--batch-size", type=int, default=32, help="reports generated at once per process (default: %(default)s)")
    q.add_argument("--workers", type=int, default=min(4, available_cpus()),
                   help="image-decoding DataLoader workers per process (default: %(default)s, at most the CPUs here)")
    q.add_argument("--limit", type=int, help="only the first N records of the query file (default: all)")
    q.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="replay the decode step as a CUDA graph (default: on with CUDA)")
    q.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start; measure before relying on it)")
    args = p.parse_args(argv)
    if (args.image is None) == (args.query_file is None):
        p.error("give either an image or --query-file")
    if args.query_file and not args.output:
        p.error("--query-file needs --output")
    if args.split is not None and args.loader != "chexpert_plus":
        p.error("--split goes with --loader chexpert_plus")
    if args.query_file and (problem := output_problem(Path(args.output), Path(args.query_file))):
        p.error(f"--output {args.output}: {problem}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be at least 1")
    if args.workers < 0 or (args.limit is not None and args.limit < 0):
        p.error("--workers and --limit must be at least 0")
    if args.reason is not None and (problem := utf8_problem(args.reason)):
        p.error(f"--reason {problem}")
    if args.device is not None and (problem := device_problem(args.device)):
        p.error(f"--device {args.device}: {problem}")
    return args


def utf8_problem(text: str) -> str | None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates (U+DC80-U+DCFF)."""
    i = lone_surrogate(text)
    return None if i is None else f"is not UTF-8 text (byte {ord(text[i]) - 0xDC00:#04x} at character {i})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed() if args.query_file else (0, 1, None)
    if args.device and not (args.device == "cuda" and device is not None and device.type == "cuda"):
        device = torch.device(args.device)  # "cuda" under torchrun keeps this rank's own GPU
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else None  # pipeline.load: an export's own, else the device's default
    try:
        if args.query_file:
            return run_batch(args, rank, world, device, dtype)
        image = load_image(args.image)  # fail on a bad image before loading 7B parameters
        heatmaps = make_folder(args.explain) if args.explain else None
        model, tokenizer = load_model(args, device, dtype)
        text = describe(model, tokenizer, [image], [args.reason], args.max_new_tokens)[0]
        print(text, flush=True)
        if heatmaps:
            expl = explain(model, tokenizer, image, args.reason, text)
            write_explanation(expl, heatmaps, file_stem(Path(args.image).stem))
    except (OSError, ValueError) as e:  # OSError: a missing file, an unwritable output...
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
    return 0


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None):
    """pipeline.load as the arguments say; with --explain, a model that cannot give the gradients
    is refused here, before any report is generated."""
    model, tokenizer = load(args.model, args.base, device, dtype, args.tower, args.quantize)
    if args.explain and (problem := gradient_problem(model)):
        raise ValueError(f"--explain {problem}")
    return model, tokenizer


def run_batch(args: argparse.Namespace, rank: int, world: int, device: torch.device, dtype: torch.dtype | None) -> int:
    query = Path(args.query_file)
    folder = Path(args.image_folder) if args.image_folder else query if query.is_dir() else query.parent
    if args.loader in TEST_SETS:  # fail on a bad query file first
        records = load_test_set(query, args.loader, args.split, folder)[: args.limit]
    else:
        records = load_records(query, args.loader)[: args.limit]
    predicted_ids(Path(args.output))  # and on an output that is not a predictions file
    heatmaps = make_folder(args.explain) if args.explain else None
    print0(f"{len(records)} records from {args.query_file} (loader {args.loader}), {world} process(es)", file=sys.stderr)
    model, tokenizer = load_model(args, device, dtype)
    s = run_queries(
        model, tokenizer, records, folder, args.output, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        workers=args.workers, cuda_graph=device.type == "cuda" if args.cuda_graph is None else args.cuda_graph,
        compile=args.compile, rank=rank, world=world,
    )
    rate = s.predicted / s.seconds if s.seconds else 0.0
    print0(f"done: {s.predicted} predicted, {s.skipped} skipped (already in {args.output}), {s.failed} failed; "
           f"{s.seconds:.1f}s ({rate:.2f} reports/s)", file=sys.stderr)
    if heatmaps:
        barrier()  # rank 0 has merged the predictions
        predictions = {r["id"]: r["prediction"] for r in read_results(Path(args.output)) if "prediction" in r}
        n = sum_across_ranks([explain_predictions(model, tokenizer, records, folder, predictions, heatmaps, rank, world)])[0]
        print0(f"explained {n} reports in {heatmaps}", file=sys.stderr)
    if s.failed:
        print0(f"error: {s.failed} records failed; their error records are in {args.output}, and a rerun retries them "
               f"(exit code {FAILED_RECORDS})", file=sys.stderr)
        return FAILED_RECORDS
    return 0


if __name__ == "__main__":
    sys.exit(main())
