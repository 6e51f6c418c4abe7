"""RadGraph inference against a tensor-level reference written from the DyGIE++ / AllenNLP code.

The reference runs one report at a time (as the radgraph package does) with transformers'
BertTokenizer and BertModel, and the archive's tensors by their archive names; our model runs
reports in batches.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from _metrics_fixtures import REPORTS
from _radgraph_fixtures import (
    ENTITY_LABELS,
    FF_LAYERS,
    MAX_LENGTH,
    MAX_SPAN_WIDTH,
    PACKAGE_SPLIT,
    RELATION_LABELS,
    SPANS_PER_WORD,
    archive_files,
    tiny_radgraph,
    write_archive,
)
from llavarad.metrics.radgraph import load_radgraph
from llavarad.metrics.radgraph_model import Annotation
from llavarad.metrics.radgraph_text import split_words, word_pieces

NER = "_ner._ner_scorers.radgraph__ner_labels"
PRUNER = "_relation._mention_pruners.radgraph__relation_labels._scorer"
REL_FF = "_relation._relation_feedforwards.radgraph__relation_labels"
REL_OUT = "_relation._relation_scorers.radgraph__relation_labels"

LONG = " ".join(REPORTS[2:])  # about 200 words: many BERT windows, over 64 kept mentions
TEXTS = [t for t in REPORTS if t.strip()] + [LONG, "Effusion", "a \u200b b"]


def reference_word_vectors(text: str, bert, tokenizer) -> tuple[list[str], torch.Tensor]:
    """AllenNLP's mismatched indexer + embedder with max_length folding."""
    words = re.sub(PACKAGE_SPLIT, " ", text).split()
    pieces, offsets = [], []
    for w in words:  # each word tokenized on its own; inclusive offsets after the leading [CLS]
        ids = tokenizer.encode(w, add_special_tokens=False)
        offsets.append((1 + len(pieces), len(pieces) + len(ids)) if ids else None)
        pieces += ids
    room = MAX_LENGTH - 2
    windows = [[tokenizer.cls_token_id, *pieces[i : i + room], tokenizer.sep_token_id] for i in range(0, len(pieces), room)]
    ids = torch.zeros(len(windows), MAX_LENGTH, dtype=torch.long)
    mask = torch.zeros(len(windows), MAX_LENGTH, dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w)], mask[i, : len(w)] = torch.tensor(w), 1
    with torch.no_grad():
        out = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    # Unfold: [CLS] of the first window, every window's pieces, [SEP] of the last window.
    seq = torch.cat([out[0, :1]] + [out[i, 1 : len(w) - 1] for i, w in enumerate(windows)] + [out[-1, len(windows[-1]) - 1 :][:1]])
    vectors = [seq[a : b + 1].mean(0) if (a, b) != (-1, -1) else torch.zeros(seq.shape[1]) for a, b in
               (o if o is not None else (-1, -1) for o in offsets)]
    return words, torch.stack(vectors)


def reference_annotation(words: torch.Tensor, sd: dict) -> tuple[list, list]:
    """DyGIE++'s NER tagger and relation extractor for one sentence."""

    def ff(x, prefix):
        for i in range(FF_LAYERS):
            x = F.relu(F.linear(x, sd[f"{prefix}._linear_layers.{i}.weight"], sd[f"{prefix}._linear_layers.{i}.bias"]))
        return x

    n = words.shape[0]
    spans = [(s, e) for s in range(n) for e in range(s, min(s + MAX_SPAN_WIDTH, n))]  # enumerate_spans
    starts, ends = torch.tensor([s for s, _ in spans]), torch.tensor([e for _, e in spans])
    width = sd["_endpoint_span_extractor._span_width_embedding.weight"][ends - starts]
    span_emb = torch.cat([words[starts], words[ends], width], -1)

    ner = F.linear(ff(span_emb, f"{NER}.0._module"), sd[f"{NER}.1._module.weight"], sd[f"{NER}.1._module.bias"])
    ner = torch.cat([torch.zeros(len(spans), 1), ner], -1)
    _, labels = ner.max(1)
    entities = [(s, e, ENTITY_LABELS[l]) for (s, e), l in zip(spans, labels.tolist()) if l != 0]

    mention = F.linear(ff(span_emb, f"{PRUNER}.0._module"), sd[f"{PRUNER}.1._module.weight"], sd[f"{PRUNER}.1._module.bias"])
    keep = int(torch.ceil(torch.tensor([n]).float() * SPANS_PER_WORD).item())
    _, top = mention.topk(keep, 0)
    top, _ = torch.sort(top.squeeze(-1))
    e = span_emb[top]
    k = e.shape[0]
    pairs = torch.cat([e.unsqueeze(1).repeat(1, k, 1), e.unsqueeze(0).repeat(k, 1, 1), e.unsqueeze(1) * e.unsqueeze(0)], -1)
    rel = F.linear(ff(pairs, REL_FF), sd[f"{REL_OUT}.weight"], sd[f"{REL_OUT}.bias"])
    rel = rel + mention[top].unsqueeze(-1) + mention[top].transpose(0, 1).unsqueeze(-1)
    rel = torch.cat([torch.zeros(k, k, 1), rel], -1)
    _, rel_labels = rel.max(-1)
    rel_labels -= 1
    relations = [(*spans[top[i]], *spans[top[j]], RELATION_LABELS[rel_labels[i, j]]) for i, j in (rel_labels >= 0).nonzero().tolist()]
    return entities, relations


def named(a: Annotation) -> tuple[list, list]:
    return ([(s, e, ENTITY_LABELS[l]) for s, e, l in a.entities], [(*x[:4], RELATION_LABELS[x[4]]) for x in a.relations])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_radgraph(tmp_path_factory.mktemp("radgraph"))


@pytest.fixture(scope="module")
def reference(tiny):
    from transformers import BertTokenizer

    archive, vocab, sd, bert = tiny
    tokenizer = BertTokenizer(vocab, do_lower_case=True)
    out = []
    for text in TEXTS:
        words, vectors = reference_word_vectors(text, bert, tokenizer)
        out.append((words, vectors, *reference_annotation(vectors, sd)))
    return out


@pytest.mark.parametrize("batch_size", [1, 5])
def test_annotations_match_reference(tiny, reference, batch_size):
    archive, vocab, sd, bert = tiny
    rg = load_radgraph(archive, vocab)
    reports = [word_pieces(split_words(t), rg.tokenizer) for t in TEXTS]
    for b in range(0, len(TEXTS), batch_size):
        batch = reports[b : b + batch_size]
        vectors = rg.model.embed_words(batch, rg.tokenizer.cls_id, rg.tokenizer.sep_id)
        annotations = rg.model.annotate(batch, rg.tokenizer.cls_id, rg.tokenizer.sep_id)
        for i, (v, a) in enumerate(zip(vectors, annotations)):
            words, ref_vectors, ref_entities, ref_relations = reference[b + i]
            assert split_words(TEXTS[b + i]) == words
            torch.testing.assert_close(v, ref_vectors, rtol=1e-4, atol=1e-5)
            assert named(a) == (ref_entities, ref_relations), TEXTS[b + i][:40]


def test_reference_is_not_trivial(reference):
    """The tiny weights give some entities and relations, never all of them; the long report
    spans many BERT windows and keeps more mentions than one chunk of pairs."""
    n_spans = sum(sum(min(MAX_SPAN_WIDTH, len(w) - s) for s in range(len(w))) for w, *_ in reference)
    n_entities = sum(len(e) for *_, e, _ in reference)
    n_pairs = sum(math.ceil(len(w) * SPANS_PER_WORD) ** 2 for w, *_ in reference)
    n_relations = sum(len(r) for *_, r in reference)
    assert 0.1 * n_spans < n_entities < 0.9 * n_spans
    assert 0.01 * n_pairs < n_relations < 0.9 * n_pairs
    assert {label for *_, e, _ in reference for *_, label in e} == set(ENTITY_LABELS[1:])
    assert {label for *_, r in reference for *_, label in r} == set(RELATION_LABELS)
    long_words = reference[TEXTS.index(LONG)][0]
    assert math.ceil(len(long_words) * SPANS_PER_WORD) > 64
    words, vectors, *_ = reference[-1]
    assert words[1] == "\u200b" and vectors[1].abs().sum() == 0  # no wordpiece: a zero vector


def test_folder_archive_loads_the_same(tiny, tmp_path):
    archive, vocab, sd, bert = tiny
    folder = tmp_path / "radgraph"
    write_archive(folder, archive_files(sd))
    texts = TEXTS[:6]
    assert load_radgraph(str(folder), vocab).annotate(texts) == load_radgraph(archive, vocab).annotate(texts)


def test_annotation_dict_follows_the_package(tiny):
    """Entities numbered from "1" in span order; a relation is listed on its first span's entity
    and only when its second span is an entity too; empty texts have no entities."""
    archive, vocab, *_ = tiny
    rg = load_radgraph(archive, vocab)
    words = "left basal atelectasis , effusion".split()
    a = Annotation(
        entities=[(0, 0, 1), (1, 2, 4), (2, 2, 2), (4, 4, 3)],
        relations=[(2, 2, 0, 0, 1), (2, 2, 3, 3, 0), (1, 2, 4, 4, 2), (2, 2, 4, 4, 0), (3, 3, 0, 0, 1)],
    )
    assert rg._to_dict(words, a) == {
        "text": "left basal atelectasis , effusion",
        "entities": {
            "1": {"tokens": "left", "label": "ANAT-DP", "start_ix": 0, "end_ix": 0, "relations": []},
            "2": {"tokens": "basal atelectasis", "label": "OBS-DA", "start_ix": 1, "end_ix": 2, "relations": [["suggestive_of", "4"]]},
            "3": {"tokens": "atelectasis", "label": "OBS-DP", "start_ix": 2, "end_ix": 2, "relations": [["located_at", "1"], ["modify", "4"]]},
            "4": {"tokens": "effusion", "label": "OBS-U", "start_ix": 4, "end_ix": 4, "relations": []},
        },
    }
    assert rg.annotate(["", "  ", "( ) ."])[:2] == [{"text": "", "entities": {}}] * 2
