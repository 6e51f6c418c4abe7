"""Findings for every record of a query file: sharded over torchrun ranks, resumable, and fast.

How a run goes (`run_queries`):
  1. ids that already have a prediction in the output (or in part files a killed multi-process run
     left) are skipped; each rank takes every world-th remaining record, in query order;
  2. prompts are tokenized; one that does not fit the decoder's context with max_new_tokens
     becomes an `error` record; the others are sorted longest first (similar lengths prefill
     together; the largest batch comes first, so running out of memory shows at once);
  3. DataLoader workers read and preprocess the images while the GPU generates; an unreadable
     image becomes an `error` record and the run goes on;
  4. BatchGenerator keeps `batch_size` rows busy, refilling each finished row with the next prompt;
  5. each report is appended and flushed as soon as it is done (world 1: to the output itself;
     else to `<output>.rank<r>.part`), so a kill loses only the reports in flight;
  6. rank 0 merges everything into the output in query order, one line per id.
"""

import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from llavarad.dist import barrier, sum_across_ranks
from llavarad.infer.generate import BatchGenerator
from llavarad.infer.images import load_image, preprocess
from llavarad.infer.pipeline import context_overflow, embed_images, prompt_ids
from llavarad.infer.records import Record, is_id
from llavarad.jsonl import Appender, read_jsonl
from llavarad.model.llava import LlavaRad
from llavarad.model.tokenizer import Tokenizer


@dataclass
class Summary:
    predicted: int  # reports written by this run (all ranks)
    skipped: int  # records that already had a prediction
    failed: int  # records written as an `error` (unreadable image, prompt over the context; all ranks)
    seconds: float


class ImageFiles(Dataset):
    """Image i -> (i, pixels (3, S, S) or None, error message or None); runs in DataLoader workers."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        path = self.paths[i]
        try:
            return i, preprocess(load_image(str(path)), self.image_size), None
        except (ValueError, OSError) as e:
            return i, None, str(e) if str(path) in str(e) else f"{path}: {e}"


def _as_list(batch: list) -> list:
    return batch


def part_path(output: Path, rank: int, world: int) -> Path:
    """Where a rank appends its reports: the output itself in a single process."""
    return output if world == 1 else output.with_name(f"{output.name}.rank{rank}.part")


def part_files(output: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(glob.escape(str(output)) + ".rank*.part"))


def read_results(path: Path) -> list[dict]:
    """The records of a predictions file we append to (a torn last line, a kill mid-write, is dropped)."""
    if not path.is_file():
        return []
    results = read_jsonl(path, resumable=True)
    for n, rec in results:
        if not is_id(rec.get("id")):
            raise ValueError(f"{path}:{n}: no 'id' (a string or an integer); not a predictions file?")
    return [rec for _, rec in results]


def predicted_ids(output: Path) -> set[str | int]:
    """Ids that already have a prediction; failed ones (an `error` record) are tried again."""
    return {r["id"] for p in [output, *part_files(output)] for r in read_results(p) if "prediction" in r}


def output_problem(output: Path, query_file: Path) -> str | None:
    """Why the predictions cannot go to `output`, or None; checked before anything is read or
    written. The query file itself (the same path, a symlink or a hard link to it) would be appended
    to and then replaced; a missing folder is made (jsonl.Appender), so the nearest existing one must
    take a new file."""
    if output.exists() and query_file.exists() and os.path.samefile(output, query_file):
        return f"is the query file {query_file}; give the predictions a file of their own"
    if output.is_dir():
        return "is a folder, expected a predictions file"
    if output.exists():
        return None if os.access(output, os.W_OK) else "cannot be written (permission denied)"
    folder = output.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    return None if os.access(folder, os.W_OK | os.X_OK) else f"cannot create a file in {folder} (permission denied)"


def merge_results(output: Path, order: list[str | int]) -> None:
    """Rewrite the output from itself and the part files: one line per id (a prediction beats an
    error), the query's ids in query order, then any other ids the file held; parts are removed."""
    parts = part_files(output)
    best: dict[str | int, dict] = {}
    for path in [output, *parts]:
        for rec in read_results(path):
            key = rec["id"]
            if "prediction" in rec or "prediction" not in best.get(key, {}):
                best[key] = rec
    known = set(order)
    lines = [best[i] for i in order if i in best] + [r for i, r in best.items() if i not in known]
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    tmp.replace(output)
    for p in parts:
        p.unlink()


def _result(rec: Record, **fields: str) -> dict:
    """The official prediction-file record: id, query, reference (null when unknown), then the outcome."""
    return {"id": rec.id, "query": rec.query, "reference": rec.reference, **fields}


@torch.no_grad()
def run_queries(
    model: LlavaRad, tokenizer: Tokenizer, records: list[Record], image_folder: str | Path, output: str | Path,
    batch_size: int = 32, max_new_tokens: int = 256, workers: int = 4, cuda_graph: bool = False,
    compile: bool = False, rank: int = 0, world: int = 1, progress: bool = True,
) -> Summary:
    """Generate a report for every record not yet predicted in `output`; every rank calls this."""
    t0, output, folder = time.time(), Path(output), Path(image_folder)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"query id {json.dumps(dup)} appears more than once; ids must be unique to resume a run")
    done = predicted_ids(output)
    todo = [r for r in records if r.id not in done]
    mine = todo[rank::world]
    barrier()  # every rank has read the finished ids before any rank writes

    prompts = [prompt_ids(tokenizer, r.question) for r in mine]
    writer = Appender(part_path(output, rank, world))
    bar = tqdm(total=len(mine), unit=" reports", desc=f"rank 0 of {world}" if world > 1 else None,
               disable=not progress or rank != 0, file=sys.stderr, dynamic_ncols=True)
    failed = predicted = 0

    def fail(rec: Record, error: str) -> None:
        """An error record in place of the report; the run goes on."""
        nonlocal failed
        tqdm.write(f"error: {error}", file=sys.stderr)
        writer.write(_result(rec, error=error))
        failed += 1
        bar.update()

    fits = []
    for rec, prompt in zip(mine, prompts):
        if problem := context_overflow(model, prompt, max_new_tokens):
            fail(rec, f"query {json.dumps(rec.id)}: {problem}")
        else:
            fits.append((rec, prompt))
    fits.sort(key=lambda pair: -len(pair[1]))  # longest first, stable
    mine, prompts = [rec for rec, _ in fits], [ids for _, ids in fits]

    def embedded_prompts():
        """(index, prompt embeddings (T, dim)), one DataLoader batch of images at a time."""
        paths = [folder / r.image for r in mine]
        loader = DataLoader(ImageFiles(paths, model.tower.cfg.image_size), batch_size=batch_size, num_workers=workers, collate_fn=_as_list)
        for chunk in loader:
            good = []
            for i, pixels, error in chunk:
                if error is None:
                    good.append((i, pixels))
                else:
                    fail(mine[i], error)
            if not good:
                continue
            embeds = embed_images(model, torch.stack([p for _, p in good]), [prompts[i] for i, _ in good])  # k x (T_i, dim)
            yield from zip((i for i, _ in good), embeds)

    if mine:
        max_len = max(model.positions(p) for p in prompts) + max_new_tokens
        gen = BatchGenerator(model.llm, min(batch_size, len(mine)), max_len, tokenizer.eos_id, cuda_graph=cuda_graph, compile=compile)
        for i, tokens in gen.run(embedded_prompts(), max_new_tokens):
            writer.write(_result(mine[i], prediction=tokenizer.decode(tokens)))
            predicted += 1
            bar.update()
    writer.close()
    bar.close()
    predicted, failed = sum_across_ranks([predicted, failed])  # also waits for every rank to finish
    if rank == 0:
        merge_results(output, ids)
    return Summary(predicted, len(records) - len(todo), failed, time.time() - t0)
