"""Training data: the tokenizer's label masks survive image expansion, collate and truncation; bad
records and images are reported; the sampler is deterministic, resumable and world-size independent."""

import json

import pytest
import torch
from _sp_fixtures import train_tiny_sp
from _train_fixtures import FINDINGS, N_IMAGE, annotation, write_data

from llavarad.model.prompt import build_prompt

from llavarad.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Tokenizer
from llavarad.train.data import StepSampler, TrainDataset, accumulation_steps, collate, eval_batches, load_train_records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data, images = write_data(root)
    return root, data, images, Tokenizer(str(train_tiny_sp(root)))


def dataset(world, template, max_len=256, records=None):
    root, data, images, tokenizer = world
    records = records or load_train_records(data, "mimic_train_findings")
    return TrainDataset(records, images, tokenizer, template, N_IMAGE, 28, max_len)


def expand(labels, at):
    """The tokenizer's labels with the image token widened to the N_IMAGE unsupervised positions of its features."""
    return labels[:at] + [IGNORE_INDEX] * N_IMAGE + labels[at + 1 :]


@pytest.mark.parametrize("template", ["plain", "v1"])
def test_collate_keeps_the_tokenizer_masks(world, template):
    ds = dataset(world, template)
    tokenizer = world[3]
    batch = collate([ds[i] for i in range(4)])  # records 0, 2 with a reason; 1, 3 without
    assert len(batch["ids"]) == 4 and batch["pixels"].shape == (4, 3, 28, 28)
    T = max(len(row) for row in batch["ids"])
    assert {len(row) for row in batch["ids"]} == {T} and batch["labels"].shape == (4, T - 1 + N_IMAGE)
    n_supervised = 0
    for b in range(4):
        rec = ds.records[b]
        ids, labels = tokenizer.encode_plain(rec.reference) if template == "plain" else tokenizer.encode_v1(rec.question, rec.reference)
        at = ids.index(IMAGE_TOKEN_INDEX)
        assert batch["ids"][b] == ids + [0] * (T - len(ids))  # right-padded with <unk>, the image token in place
        n = len(ids) - 1 + N_IMAGE  # positions once splice_image puts the N_IMAGE features at `at`
        assert batch["labels"][b, :n].tolist() == expand(labels, at)
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()  # right padding is never supervised
        # What is supervised: the findings (+ newline) in plain, the answer (+ </s>) in v1.
        supervised = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
        n_supervised += len(supervised)
        if template == "plain":
            assert supervised == tokenizer.encode_text(rec.reference + "\n")
        else:
            assert supervised == tokenizer.encode_text(" " + rec.reference + "</s>")[-len(supervised) :]
            assert tokenizer.decode(supervised) == rec.reference
    assert batch["n_real"] == sum(len(ds[i]["tokens"]) - 1 + N_IMAGE for i in range(4))
    assert batch["n_supervised"] == n_supervised


def test_truncation_is_reported_and_keeps_the_masks(world, capsys):
    full = dataset(world, "v1")[0]
    cut = dataset(world, "v1", max_len=len(full["tokens"]) - 3)[0]
    assert cut["truncated"] and not full["truncated"]
    assert torch.equal(cut["tokens"], full["tokens"][:-3]) and torch.equal(cut["labels"], full["labels"][:-3])
    assert "cut to max_len" in capsys.readouterr().err
    assert collate([cut, full])["n_truncated"] == 1


def test_max_len_that_cuts_the_image_is_an_error(world):
    with pytest.raises(ValueError, match="cuts into the image"):
        dataset(world, "v1", max_len=20)


def test_unreadable_image_is_skipped_and_counted(world, tmp_path, capsys):
    root, data, images, tokenizer = world
    records = load_train_records(data, "mimic_train_findings")
    records[1].image = "p10/nowhere.png"
    records[2].image = "p10/corrupt.png"
    (images / "p10" / "corrupt.png").write_bytes(b"not a png")
    ds = dataset(world, "v1", records=records)
    batch = collate([ds[i] for i in range(3)])
    assert batch["n_missing"] == 2
    assert (batch["labels"][1:] == IGNORE_INDEX).all() and (batch["labels"][0] != IGNORE_INDEX).any()
    assert "nowhere.png" in capsys.readouterr().err


def test_empty_and_whitespace_findings_are_kept_as_the_official_code_keeps_them(world, tmp_path):
    """docs/training-recipe.md: "plain" supervises the findings' tokens and the newline; "v1" masks "" whole but
    supervises "   " and </s>."""
    root, _, images, tokenizer = world
    path = tmp_path / "a.json"
    path.write_text(json.dumps([annotation(0, "", None), annotation(1, "   ", "Cough.")]))
    records = load_train_records(path, "mimic_train_findings")
    assert [(r.id, r.reference) for r in records] == [("s0", ""), ("s1", "   ")]
    plain, v1 = (TrainDataset(records, images, tokenizer, t, N_IMAGE, 28, 256) for t in ("plain", "v1"))
    for i, findings in enumerate(["", "   "]):
        sample = plain[i]
        assert supervised(sample) == tokenizer.sp.encode(findings + "\n")  # after [BOS, image]
    assert supervised(v1[0]) == []
    whitespace = supervised(v1[1])
    assert whitespace[-1] == tokenizer.eos_id and whitespace == v1[1]["tokens"][-len(whitespace) :].tolist()
    prompt = tokenizer.encode_prompt(build_prompt(records[1].question))
    assert whitespace == tokenizer.encode_prompt(build_prompt(records[1].question) + "    </s>")[len(prompt) :]


def test_records_without_findings_are_skipped_with_a_message(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "a", "image": "a.png", "reference": ""}\n{"id": "b", "image": "b.png"}\n')
    assert [r.id for r in load_train_records(path, "default")] == ["a"]
    assert "skipped 1 records without findings (e.g. id b)" in capsys.readouterr().err
    path.write_text('{"id": "b", "image": "b.png"}\n')
    with pytest.raises(ValueError, match="no record with findings"):
        load_train_records(path, "default")


def test_a_literal_image_tag_in_findings_is_text(world):
    """Only the template's image becomes the image; the official code would hand a second -200 to the embedding."""
    root, data, images, tokenizer = world
    records = load_train_records(data, "mimic_train_findings")[:1]
    records[0].reference = "Compare with <image> prior."
    for template in ("plain", "v1"):
        sample = TrainDataset(records, images, tokenizer, template, N_IMAGE, 28, 256)[0]
        assert sample["tokens"].tolist().count(IMAGE_TOKEN_INDEX) == 1
        expected = tokenizer.sp.encode("Compare with <image> prior.\n") if template == "plain" else \
            tokenizer.sp.encode(" Compare with <image> prior.")[1:] + [tokenizer.eos_id]  # the lone "▁" goes to the prompt
        assert supervised(sample) == expected, template


def test_max_len_counts_the_image_as_one_token_as_the_official_collator(world):
    """Official: input_ids[:, :model_max_length] while the image is one id, then the id becomes N slots,
    so a cut sample is max_len - 1 + N long and keeps the labels of ids[:max_len]."""
    root, data, images, tokenizer = world
    records = load_train_records(data, "mimic_train_findings")
    ids, labels = tokenizer.encode_v1(records[1].question, records[1].reference)
    at, max_len = ids.index(IMAGE_TOKEN_INDEX), len(ids) - 2  # cuts the answer's last piece and </s>
    sample = dataset(world, "v1", max_len=max_len)[1]
    assert sample["truncated"] and sample["tokens"].tolist() == ids[:max_len]
    assert len(sample["labels"]) == max_len - 1 + N_IMAGE  # positions once the image is spliced in
    assert sample["labels"].tolist() == labels[:at] + [IGNORE_INDEX] * N_IMAGE + labels[at + 1 : max_len]
    assert len(supervised(sample)) == sum(l != IGNORE_INDEX for l in labels) - 2
    assert not dataset(world, "v1", max_len=len(ids))[1]["truncated"]


def supervised(sample: dict) -> list[int]:
    return [t for t in sample["labels"].tolist() if t != IGNORE_INDEX]


def test_global_batch_that_the_world_does_not_divide():
    assert accumulation_steps(64, 4, 4) == 4
    with pytest.raises(ValueError, match="global_batch 64 is not a multiple of micro_batch 4 x world size 3"):
        accumulation_steps(64, 4, 3)


LENGTHS = [int(x) for x in torch.randint(10, 200, (50,), generator=torch.Generator().manual_seed(0))]


def steps(world, rank, start=0, total=9, micro=2):
    s = StepSampler(LENGTHS, 8, micro, rank, world, seed=3, start_step=start, total_steps=total)
    out = list(s)
    assert len(out) == len(s)
    return [out[i : i + s.accum] for i in range(0, len(out), s.accum)]  # per step


def test_sampler_is_the_same_global_batch_for_any_world_size():
    one = steps(1, 0)
    ranks = [steps(2, r) for r in range(2)]
    for step in range(9):
        assert sorted(map(tuple, ranks[0][step] + ranks[1][step])) == sorted(map(tuple, one[step]))


def test_sampler_epochs_keep_the_last_partial_batch_and_resume():
    """As the official Trainer: ceil(50 / 8) = 7 steps per epoch, the 7th with the 2 remaining samples
    and 6 unsupervised fillers (index 50 + its shortest sample, see TrainDataset)."""
    per_epoch = 7
    run = steps(1, 0, total=2 * per_epoch)
    flat = [i for step in run for mb in step for i in mb]
    for epoch in range(2):
        seen = flat[epoch * per_epoch * 8 : (epoch + 1) * per_epoch * 8]
        assert sorted(i for i in seen if i < 50) == list(range(50))  # every sample once in an epoch
        last = seen[-8:]
        assert last[2:] == [50 + last[1]] * 6 and LENGTHS[last[1]] <= LENGTHS[last[0]]
        assert all(i < 50 for i in seen[:-8])
    assert flat[:56] != flat[56:]  # a new permutation each epoch
    assert steps(2, 1, start=4) == steps(2, 1)[4:]  # resuming at step 4 = the rest of the run


def test_sampler_groups_lengths():
    g = torch.Generator().manual_seed(1)
    padded = padded_random = real = 0
    for step in steps(1, 0, total=6):  # the full steps of the first epoch
        batch = [i for mb in step for i in mb]
        assert [LENGTHS[i] for i in batch] == sorted((LENGTHS[i] for i in batch), reverse=True)
        shuffled = [batch[j] for j in torch.randperm(len(batch), generator=g)]
        real += sum(LENGTHS[i] for i in batch)
        padded += sum(2 * max(LENGTHS[i] for i in mb) for mb in step)
        padded_random += sum(2 * max(LENGTHS[i] for i in shuffled[j : j + 2]) for j in range(0, 8, 2))
    assert padded - real < 0.6 * (padded_random - real)  # at most 60% of the padding of random micro-batches


def test_eval_batches_cover_every_sample_once_and_even_ranks():
    per_rank = [eval_batches(11, 2, r, 3) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    flat = sorted(i for b in per_rank for mb in b for i in mb)
    assert [i for i in flat if i < 11] == list(range(11)) and len(flat) == 12  # one filler (index 11)


def test_filler_samples_are_unsupervised(world):
    ds = dataset(world, "plain")
    filler = ds[len(ds) + 1]
    assert torch.equal(filler["tokens"], ds[1]["tokens"]) and (filler["labels"] == IGNORE_INDEX).all()
    assert FINDINGS[1] == ds.records[1].reference
