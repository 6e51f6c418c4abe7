"""Training data: records -> token ids with label masks + preprocessed image, batched with little padding.

- `TrainDataset` tokenizes one record with the stage's template ("plain" or "v1", llavarad.model.tokenizer)
  and loads + preprocesses its image; it runs in the DataLoader's worker processes. A sample of
  more than `max_len` token ids is cut at the end (and reported) while the image is still one
  token, as the official collator cuts. Its labels get the N image positions that
  `llava.splice_image` (the one splice, shared with inference) puts in place of the image token.
  An unreadable image gives a sample with nothing supervised (counted, see train_loop).
- `StepSampler` deals out micro-batches as a pure function of the optimizer step: step s takes the
  next `global_batch` indices of a per-epoch permutation (the epoch's last step the remainder),
  sorts them by length so each micro-batch holds samples of similar lengths (little padding), and
  deals the micro-batches to the ranks. Resuming at step s needs only s, and the global batch is
  the same whatever the world size.
- `collate` right-pads, the only place a batch is padded; causal attention never lets a real token
  see a pad, and pads are not supervised.

No packing: a LLaVA-Rad sample is 1369 image slots + 60 to 300 text tokens, so two would rarely fit
a row, and length grouping already keeps padding to a few tokens per row.
"""

import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from llavarad.infer.images import load_image, preprocess
from llavarad.infer.records import Record, load_records
from llavarad.model.llava import image_position, splice_labels
from llavarad.model.tokenizer import IGNORE_INDEX, PAD_ID, Tokenizer

TEMPLATES = {"pretrain": "plain", "lora": "v1"}


def load_train_records(path: str | Path, loader: str) -> list[Record]:
    """The records with a findings text, empty or whitespace-only ones included, as the official code
    keeps them (see Tokenizer.encode_plain / encode_v1 for what they supervise); records with none
    (a JSONL line without "reference") are dropped, and said so."""
    records = load_records(path, loader)
    kept = [r for r in records if isinstance(r.reference, str)]
    if len(kept) < len(records):
        none = next(r for r in records if not isinstance(r.reference, str))
        print(f"warning: {path}: skipped {len(records) - len(kept)} records without findings (e.g. id {none.id})", file=sys.stderr)
    if not kept:
        raise ValueError(f"{path}: no record with findings to train on (loader {loader!r})")
    return kept


def text_length(record: Record, template: str) -> int:
    """A cheap stand-in for the token count, used only to order samples by length."""
    return len(record.reference) + (len(record.question) if template == "v1" else 0)


class TrainDataset(Dataset):
    """Index i < len: record i. Index i >= len: record i % len with nothing supervised, a filler
    that fills an epoch's partial last step and gives every rank the same number of validation
    batches (FSDP needs every rank in every forward)."""

    def __init__(self, records: list[Record], image_folder: str | Path, tokenizer: Tokenizer, template: str,
                 n_image_tokens: int, image_size: int, max_len: int):
        if template not in TEMPLATES.values():
            raise ValueError(f"template {template!r}: choose from {', '.join(TEMPLATES.values())}")
        self.records, self.image_folder, self.tokenizer = records, Path(image_folder), tokenizer
        self.template, self.n_image_tokens, self.image_size, self.max_len = template, n_image_tokens, image_size, max_len
        at = image_position(self.encode(records[0])[0])
        if at >= max_len:
            raise ValueError(f"max_len {max_len} cuts into the image: the {template} prompt needs at least {at + 1} tokens")

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, record: Record) -> tuple[list[int], list[int]]:
        if self.template == "plain":
            return self.tokenizer.encode_plain(record.reference)
        return self.tokenizer.encode_v1(record.question, record.reference, self.max_len)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i % len(self.records)]
        ids, labels = self.encode(record)
        # As the official collator: cut at max_len while the image is still one token.
        truncated = len(ids) > self.max_len
        if truncated:
            print(f"warning: record {record.id}: {len(ids)} tokens, cut to max_len {self.max_len}", file=sys.stderr)
            ids, labels = ids[: self.max_len], labels[: self.max_len]
        labels = splice_labels(ids, labels, self.n_image_tokens)
        path = self.image_folder / record.image
        try:
            pixels = preprocess(load_image(path), self.image_size)  # (3, S, S)
            missing = False
        except (OSError, ValueError) as e:  # missing, unreadable or corrupt: skip the sample, keep the batch shape
            print(f"warning: record {record.id}: {e}; sample skipped", file=sys.stderr)
            pixels, missing = torch.zeros(3, self.image_size, self.image_size), True
        if missing or i >= len(self.records):
            labels = [IGNORE_INDEX] * len(labels)
        return {
            "tokens": torch.tensor(ids),  # (T,): one IMAGE_TOKEN_INDEX
            "labels": torch.tensor(labels),  # (T - 1 + N,): one per position of the spliced row
            "pixels": pixels,
            "missing": missing and i < len(self.records),
            "truncated": truncated and i < len(self.records),
        }


def collate(samples: list[dict]) -> dict:
    """The batch, padded here and only here: `ids` (B lists of T token ids, right-padded with the pad
    id, so every row keeps its one image token in place and llava.splice_image makes each a row of
    T - 1 + N embeddings), labels (B, T - 1 + N) padded with IGNORE_INDEX, pixels (B, 3, S, S), and
    counts (made here, in the loader's workers, so the step loop only sums them)."""
    B, T = len(samples), max(len(s["tokens"]) for s in samples)
    ids = [s["tokens"].tolist() + [PAD_ID] * (T - len(s["tokens"])) for s in samples]
    labels = torch.full((B, max(len(s["labels"]) for s in samples)), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        labels[b, : len(s["labels"])] = s["labels"]
    return {
        "ids": ids,
        "labels": labels,
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "n_supervised": int((labels[:, 1:] != IGNORE_INDEX).sum()),  # tokens with a target: the loss's denominator
        "n_real": sum(len(s["labels"]) for s in samples),  # positions that are not padding
        "n_missing": sum(s["missing"] for s in samples),
        "n_truncated": sum(s["truncated"] for s in samples),
    }


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    """As the official Trainer: the last, partial global batch of an epoch is a step too."""
    return -(-n_samples // global_batch)


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per rank per optimizer step; the global batch must split evenly."""
    if global_batch % (micro_batch * world):
        raise ValueError(
            f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} x world size {world}; "
            f"choose a global batch that {micro_batch * world} divides, or another micro batch or number of processes"
        )
    return global_batch // (micro_batch * world)


class StepSampler:
    """The batch sampler of one rank: for each optimizer step in [start_step, total_steps), its
    `accum` micro-batches, in order. Epochs follow each other without a break. The last step of an
    epoch takes the len % global_batch remaining samples (when there are any), and unsupervised
    fillers (indices >= len, see TrainDataset: copies of its shortest sample) keep every rank's
    micro-batches full, so each sample is seen once per epoch and nothing else weighs in the loss."""

    def __init__(self, lengths: list[int], global_batch: int, micro_batch: int, rank: int, world: int,
                 seed: int, start_step: int, total_steps: int):
        self.accum = accumulation_steps(global_batch, micro_batch, world)
        self.lengths, self.global_batch, self.micro_batch = lengths, global_batch, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = steps_per_epoch(len(lengths), global_batch)
        self._epoch, self._perm = -1, []

    def micro_batches(self, step: int) -> list[list[int]]:
        """All micro-batches of one step, longest samples first; rank r takes r, r + world, ..."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.lengths), generator=g).tolist()
        batch = self._perm[k * self.global_batch : (k + 1) * self.global_batch]
        batch.sort(key=lambda i: -self.lengths[i])
        batch += [len(self.lengths) + batch[-1]] * (self.global_batch - len(batch))  # fillers in a partial batch
        return [batch[j : j + self.micro_batch] for j in range(0, self.global_batch, self.micro_batch)]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            yield from self.micro_batches(step)[self.rank :: self.world]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum


def eval_batches(n: int, micro_batch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's validation micro-batches covering n samples once; indices >= n are unsupervised
    fillers (see TrainDataset) so that every rank runs the same number of forwards."""
    per_round = micro_batch * world
    total = -(-n // per_round) * per_round
    micro = [list(range(j, j + micro_batch)) for j in range(0, total, micro_batch)]
    return micro[rank::world]
