"""The RadGraph model (DyGIE++ with a BERT encoder) at inference, in plain PyTorch.

For a report of n words, every span of up to `max_span_width` words is a candidate entity; its
vector is [first word; last word; width embedding]. An entity scorer labels each span (label 0,
"no entity", scores 0). Separately, a mention scorer keeps the ceil(n * spans_per_word) best
spans, and a relation scorer labels every ordered pair of kept spans from [a; b; a * b] plus both
mention scores (label 0, "no relation", scores 0). Dropout is off, so the feedforwards are plain
Linear + ReLU stacks.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llavarad.metrics.bert import Bert, BertConfig, pad_batch
from llavarad.metrics.radgraph_text import Pieces, fold

# Rows of span pairs scored at once: bounds the (rows, K, 3 * span_dim) pair tensor of long reports.
PAIR_ROWS = 64


@dataclass
class RadGraphConfig:
    max_span_width: int = 8
    feature_size: int = 20  # width embedding size
    ff_layers: int = 2
    ff_hidden: int = 150
    spans_per_word: float = 0.5  # kept mentions per word, for relations
    max_length: int = 512  # wordpieces per BERT window, [CLS] and [SEP] included
    bert_name: str = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"

    @property
    def lowercase(self) -> bool:
        """Whether the BERT tokenizer lowercases: only a checkpoint named "cased" (and not
        "uncased") keeps case; BertTokenizer's default is to lowercase."""
        name = self.bert_name.lower()
        return "uncased" in name or "cased" not in name


@dataclass
class Annotation:
    """One report's predictions, in word indices (inclusive ends, as the radgraph package).

    entities: (start, end, label) in span order (by start, then end).
    relations: (start1, end1, start2, end2, label) over pairs of kept spans, row-major.
    """

    entities: list[tuple[int, int, int]]
    relations: list[tuple[int, int, int, int, int]]


class FeedForward(nn.Module):
    """AllenNLP's FeedForward as DyGIE++ builds it: Linear + ReLU on every layer."""

    def __init__(self, dim_in: int, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim_in if i == 0 else hidden, hidden) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


class RadGraphModel(nn.Module):
    def __init__(self, cfg: RadGraphConfig, bert_cfg: BertConfig, n_entity_labels: int, n_relation_labels: int):
        """n_entity_labels counts the null label; n_relation_labels does not (as the vocabulary files)."""
        super().__init__()
        self.cfg = cfg
        self.bert = Bert(bert_cfg)
        span_dim = 2 * bert_cfg.hidden + cfg.feature_size
        self.width_embedding = nn.Embedding(cfg.max_span_width, cfg.feature_size)
        self.entity_ff = FeedForward(span_dim, cfg.ff_hidden, cfg.ff_layers)
        self.entity_out = nn.Linear(cfg.ff_hidden, n_entity_labels - 1)
        self.mention_ff = FeedForward(span_dim, cfg.ff_hidden, cfg.ff_layers)
        self.mention_out = nn.Linear(cfg.ff_hidden, 1)
        self.relation_ff = FeedForward(3 * span_dim, cfg.ff_hidden, cfg.ff_layers)
        self.relation_out = nn.Linear(cfg.ff_hidden, n_relation_labels)

    @torch.no_grad()
    def annotate(self, reports: list[Pieces], cls_id: int, sep_id: int) -> list[Annotation]:
        """Entities and relations of a batch of reports (each non-empty in words)."""
        words = self.embed_words(reports, cls_id, sep_id)
        return [self._annotate_one(w) for w in words]

    def embed_words(self, reports: list[Pieces], cls_id: int, sep_id: int) -> list[torch.Tensor]:
        """Per report, its word vectors (n_words, H): the mean of each word's wordpiece vectors."""
        device = self.width_embedding.weight.device
        windows = [fold(r.ids, self.cfg.max_length, cls_id, sep_id) for r in reports]
        flat = [w for ws in windows for w in ws]
        ids, mask = pad_batch(flat)
        hidden = self.bert(ids.to(device), mask.to(device))  # (windows, T, H)

        out, first = [], 0
        for report, ws in zip(reports, windows):
            # The pieces' vectors in order: each window without its [CLS] and [SEP].
            pieces = torch.cat([hidden[first + i, 1 : len(w) - 1] for i, w in enumerate(ws)])  # (P, H)
            first += len(ws)
            # Word j = mean of its pieces, a zero vector if it has none.
            average = torch.zeros(len(report.spans), len(report.ids), device=device)  # (n, P)
            for j, span in enumerate(report.spans):
                if span is not None:
                    average[j, span[0] : span[1]] = 1.0 / (span[1] - span[0])
            out.append(average @ pieces)  # (n, H)
        return out

    def _annotate_one(self, words: torch.Tensor) -> Annotation:
        n = words.shape[0]
        device = words.device
        spans = [(s, e) for s in range(n) for e in range(s, min(s + self.cfg.max_span_width, n))]
        starts = torch.tensor([s for s, _ in spans], device=device)
        ends = torch.tensor([e for _, e in spans], device=device)
        span_emb = torch.cat([words[starts], words[ends], self.width_embedding(ends - starts)], -1)  # (S, D)

        # Entities: label 0 means no entity and scores 0; ties go to the lower label, as torch.max.
        entity_scores = self.entity_out(self.entity_ff(span_emb))  # (S, L - 1)
        entity_scores = torch.cat([entity_scores.new_zeros(len(spans), 1), entity_scores], -1)  # (S, L)
        entity_labels = entity_scores.argmax(-1).tolist()
        entities = [(s, e, lab) for (s, e), lab in zip(spans, entity_labels) if lab != 0]

        # Mentions for relations: the k best spans by mention score, put back in span order.
        # k is computed in float32 as DyGIE++ does; it cannot exceed the number of spans.
        k = int(torch.ceil(torch.tensor([float(n)]) * self.cfg.spans_per_word).item())
        k = min(k, len(spans))
        mention_scores = self.mention_out(self.mention_ff(span_emb)).squeeze(-1)  # (S,)
        top = mention_scores.topk(k).indices.sort().values  # (K,)
        top_emb, top_scores = span_emb[top], mention_scores[top]  # (K, D), (K,)
        top_spans = [spans[i] for i in top.tolist()]

        relations = []
        for r0 in range(0, k, PAIR_ROWS):
            a = top_emb[r0 : r0 + PAIR_ROWS, None, :].expand(-1, k, -1)  # (rows, K, D)
            b = top_emb[None, :, :].expand(a.shape[0], -1, -1)  # (rows, K, D)
            scores = self.relation_out(self.relation_ff(torch.cat([a, b, a * b], -1)))  # (rows, K, R)
            scores = scores + (top_scores[r0 : r0 + PAIR_ROWS, None, None] + top_scores[None, :, None])  # + both mention scores
            scores = torch.cat([scores.new_zeros(*scores.shape[:2], 1), scores], -1)  # (rows, K, R + 1)
            labels = scores.argmax(-1)  # (rows, K)
            hits = labels > 0
            for (i, j), label in zip(hits.nonzero().tolist(), labels[hits].tolist()):  # both row-major
                relations.append((*top_spans[r0 + i], *top_spans[j], label - 1))
        return Annotation(entities, relations)

