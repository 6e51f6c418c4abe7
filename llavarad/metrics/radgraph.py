"""F1-RadGraph: the public RadGraph model archive, report annotations, and the "partial" reward.

The archive is `radgraph.tar.gz` from the RRG_scorers release (or its unpacked folder): an AllenNLP
model archive with `config.json`, `vocabulary/*.txt` (label names) and `weights.th` (a DyGIE++
state dict). The BERT vocabulary is the `vocab.txt` of the BERT checkpoint named in config.json.
Annotations follow the radgraph package's format, so that the reward is the official one.
"""

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass

import torch
from tqdm import tqdm

from llavarad.metrics.bert import load_bert
from llavarad.metrics.cache import file_fingerprint, load_cache, save_cache
from llavarad.metrics.radgraph_model import Annotation, RadGraphConfig, RadGraphModel
from llavarad.metrics.radgraph_text import split_words, word_pieces
from llavarad.metrics.wordpiece import WordPiece

BERT_PREFIX = "_embedder.token_embedder_bert._matched_embedder.transformer_model."
# Coreference and event modules are built and saved by DyGIE++ but have zero loss weight in
# RadGraph, so inference never runs them (config.json is checked for that).
UNUSED_PREFIXES = ("_coref.", "_events.")
# Archive key -> our parameter, per feedforward layer {i} and tensor {p}; {ner} and {rel} are the
# label namespaces read from the vocabulary ("radgraph__ner_labels", "radgraph__relation_labels").
HEAD_KEYS = {
    "_endpoint_span_extractor._span_width_embedding.weight": "width_embedding.weight",
    "_ner._ner_scorers.{ner}.0._module._linear_layers.{i}.{p}": "entity_ff.layers.{i}.{p}",
    "_ner._ner_scorers.{ner}.1._module.{p}": "entity_out.{p}",
    "_relation._mention_pruners.{rel}._scorer.0._module._linear_layers.{i}.{p}": "mention_ff.layers.{i}.{p}",
    "_relation._mention_pruners.{rel}._scorer.1._module.{p}": "mention_out.{p}",
    "_relation._relation_feedforwards.{rel}._linear_layers.{i}.{p}": "relation_ff.layers.{i}.{p}",
    "_relation._relation_scorers.{rel}.{p}": "relation_out.{p}",
}
ARCHIVE_FILES = ("config.json", "weights.th")


# ---------------------------------------------------------------------------------------------
# Loading


def _read_archive(path: str) -> dict[str, bytes]:
    """config.json, weights.th and vocabulary/* of a .tar.gz archive or an unpacked folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: RadGraph archive not found")
    files: dict[str, bytes] = {}
    if os.path.isdir(path):
        for name in ARCHIVE_FILES:
            if os.path.isfile(os.path.join(path, name)):
                with open(os.path.join(path, name), "rb") as f:
                    files[name] = f.read()
        vocab_dir = os.path.join(path, "vocabulary")
        if os.path.isdir(vocab_dir):
            for name in os.listdir(vocab_dir):
                if os.path.isfile(os.path.join(vocab_dir, name)):
                    with open(os.path.join(vocab_dir, name), "rb") as f:
                        files["vocabulary/" + name] = f.read()
    else:
        try:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    name = member.name.removeprefix("./")
                    if member.isfile() and (name in ARCHIVE_FILES or name.startswith("vocabulary/")):
                        files[name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError):
            raise ValueError(f"{path}: not a RadGraph model archive (.tar.gz or folder)") from None
    missing = [n for n in (*ARCHIVE_FILES, "vocabulary/") if not any(k.startswith(n) for k in files)]
    if missing:
        raise ValueError(f"{path}: RadGraph archive has no {', '.join(missing)}")
    return files


def _config(path: str, raw: bytes) -> RadGraphConfig:
    """The inference settings from AllenNLP's config.json; a setting RadGraph never uses is an error."""
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: config.json is not JSON: {e}") from None

    def get(*keys, default=None):
        node = cfg
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                if default is not None:
                    return default
                raise ValueError(f"{path}: config.json has no {'.'.join(keys)}")
            node = node[k]
        return node

    bert = ("model", "embedder", "token_embedders", "bert")
    out = RadGraphConfig(
        max_span_width=get("model", "max_span_width"),
        feature_size=get("model", "feature_size"),
        ff_layers=get("model", "feedforward_params", "num_layers"),
        ff_hidden=get("model", "feedforward_params", "hidden_dims"),
        spans_per_word=get("model", "modules", "relation", "spans_per_word"),
        max_length=get(*bert, "max_length"),
        bert_name=get(*bert, "model_name"),
    )
    weights = get("model", "loss_weights")
    if get("dataset_reader", "max_span_width") != out.max_span_width:
        raise ValueError(f"{path}: config.json has different max_span_width for the reader and the model")
    if not isinstance(out.ff_hidden, int) or not isinstance(out.max_length, int) or out.max_length < 3:
        raise ValueError(f"{path}: config.json needs one integer hidden_dims and an integer max_length > 2")
    if weights.get("ner", 0) <= 0 or weights.get("relation", 0) <= 0:
        raise ValueError(f"{path}: config.json must have ner and relation loss weights > 0")
    if weights.get("coref", 0) > 0 or weights.get("events", 0) > 0 or get("model", "modules", "coref", "coref_prop", default=0) > 0:
        raise ValueError(f"{path}: coreference and event modules are not supported (loss weight or coref_prop > 0)")
    return out


def _labels(path: str, files: dict[str, bytes], kind: str) -> tuple[str, list[str]]:
    """The one label namespace whose name contains `kind` ("ner_labels" or "relation_labels"),
    and its labels by index, read as AllenNLP's Vocabulary.from_files does."""
    names = [n[len("vocabulary/") : -len(".txt")] for n in files if n.startswith("vocabulary/") and n.endswith(".txt")]
    matches = [n for n in names if kind in n]
    if len(matches) != 1:
        raise ValueError(f"{path}: expected one vocabulary/*{kind}.txt, found {matches or 'none'}")
    namespace = matches[0]
    patterns = files.get("vocabulary/non_padded_namespaces.txt", b"").decode("utf-8").split()
    padded = not any(namespace.endswith(p[1:]) if p.startswith("*") else namespace == p for p in patterns)
    lines = re.split(r"\r?\n", files[f"vocabulary/{namespace}.txt"].decode("utf-8"))
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return namespace, (["@@PADDING@@"] if padded else []) + lines


def _head_state_dict(path: str, sd: dict, ner: str, rel: str, layers: int) -> dict[str, torch.Tensor]:
    """The DyGIE++ head tensors under our names; a missing or unknown key is an error that names it."""
    expected = {}
    for src, dst in HEAD_KEYS.items():
        for i in range(layers) if "{i}" in src else [0]:
            for p in ("weight", "bias") if "{p}" in src else ["weight"]:
                expected[src.format(ner=ner, rel=rel, i=i, p=p)] = dst.format(i=i, p=p)
    missing = [k for k in expected if k not in sd]
    unknown = [k for k in sd if k not in expected and not k.startswith((BERT_PREFIX, *UNUSED_PREFIXES))]
    if missing or unknown:
        problems = [f"missing {k}" for k in missing] + [f"unknown {k}" for k in unknown]
        raise ValueError(f"{path}: weights.th does not match the RadGraph model: " + ", ".join(problems[:5]))
    return {dst: sd[src].float() for src, dst in expected.items()}


@dataclass
class RadGraph:
    """A loaded RadGraph model with its tokenizer and label names."""

    model: RadGraphModel
    tokenizer: WordPiece
    entity_labels: list[str]  # index 0 is "", no entity
    relation_labels: list[str]

    def annotate(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> list[dict]:
        """Per text, the radgraph package's annotation: {"text": words joined by spaces,
        "entities": {"1": {"tokens", "label", "start_ix", "end_ix", "relations": [[label, "k"]]}}}."""
        words = [split_words(t) for t in texts]
        pieces = [word_pieces(w, self.tokenizer) for w in words]
        results: list[Annotation | None] = [None] * len(texts)
        # Reports of similar length share a batch, so little of it is padding.
        todo = sorted((i for i in range(len(texts)) if words[i]), key=lambda i: len(pieces[i].ids))
        batches = [todo[b : b + batch_size] for b in range(0, len(todo), batch_size)]
        for batch in tqdm(batches, desc="RadGraph", disable=not progress):
            annotations = self.model.annotate([pieces[i] for i in batch], self.tokenizer.cls_id, self.tokenizer.sep_id)
            for i, a in zip(batch, annotations):
                results[i] = a
        return [self._to_dict(w, a) for w, a in zip(words, results)]

    def _to_dict(self, words: list[str], a: Annotation | None) -> dict:
        """The radgraph package's post-processing: entities numbered from "1" in span order; a
        relation is kept on its first span's entity when its second span is also an entity."""
        if a is None:  # a text without words
            return {"text": "", "entities": {}}
        number = {(s, e): str(k + 1) for k, (s, e, _) in enumerate(a.entities)}
        relations: dict[tuple[int, int], list] = {span: [] for span in number}  # per first span, in order
        for s1, e1, s2, e2, r in a.relations:
            if (s1, e1) in number and (s2, e2) in number:
                relations[(s1, e1)].append([self.relation_labels[r], number[(s2, e2)]])
        entities: dict[str, dict] = {}
        for k, (s, e, label) in enumerate(a.entities):
            entities[str(k + 1)] = {
                "tokens": " ".join(words[s : e + 1]),
                "label": self.entity_labels[label],
                "start_ix": s,
                "end_ix": e,
                "relations": relations[(s, e)],
            }
        return {"text": " ".join(words), "entities": entities}


def bert_name(archive: str) -> str:
    """The BERT an archive was built on (config.json's model_name): its vocab.txt is the one to use."""
    files = _read_archive(archive)
    return _config(archive, files["config.json"]).bert_name


def load_radgraph(archive: str, vocab: str, device: str = "cpu") -> RadGraph:
    """The RadGraph model of a model archive (.tar.gz or folder) and its BERT vocab.txt."""
    files = _read_archive(archive)
    cfg = _config(archive, files["config.json"])
    ner, entity_labels = _labels(archive, files, "ner_labels")
    rel, relation_labels = _labels(archive, files, "relation_labels")
    if entity_labels[0] != "":
        raise ValueError(f"{archive}: vocabulary/{ner}.txt must start with the empty (no entity) label")
    try:
        sd = torch.load(io.BytesIO(files.pop("weights.th")), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{archive}: weights.th is not a readable state dict: {e}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{archive}: weights.th is not a state dict")
    heads = _head_state_dict(archive, sd, ner, rel, cfg.ff_layers)
    try:
        bert = load_bert(sd, BERT_PREFIX)
    except ValueError as e:
        raise ValueError(f"{archive}: weights.th: {e}") from None
    with torch.device("meta"):
        model = RadGraphModel(cfg, bert.cfg, len(entity_labels), len(relation_labels))
    full = heads | {f"bert.{k}": v for k, v in bert.state_dict().items()}
    for name, param in model.state_dict().items():
        if full[name].shape != param.shape:
            raise ValueError(f"{archive}: weights.th tensor for {name} has shape {tuple(full[name].shape)}, expected {tuple(param.shape)}")
    model.load_state_dict(full, assign=True)
    return RadGraph(model.eval().to(device), WordPiece(vocab, lowercase=cfg.lowercase), entity_labels, relation_labels)


# ---------------------------------------------------------------------------------------------
# Reward


def partial_reward(hyp: dict, ref: dict) -> float:
    """F1 between the (tokens, label) items of two annotations, an item gaining True when its
    entity has a relation; 0 when either has no entity (the "partial" level of F1-RadGraph).
    Tokens keep their case, as in LLaVA-Rad's rrg_eval; the float steps are the package's."""
    if not hyp["entities"] or not ref["entities"]:
        return 0.0
    h, r = (
        {(e["tokens"], e["label"], True) if e["relations"] else (e["tokens"], e["label"]) for e in a["entities"].values()}
        for a in (hyp, ref)
    )
    precision = sum(1 for x in h if x in r) / len(h)
    recall = sum(1 for x in r if x in h) / len(r)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def annotate_cached(texts: list[str], archive: str, vocab: str, device: str, batch_size: int, cache: str | None) -> dict[str, dict]:
    """Annotations of the unique texts, reading and extending a JSON cache of them when given
    (filed under a fingerprint of the archive's and the vocab's bytes)."""
    for path, what in ((archive, "RadGraph archive"), (vocab, "RadGraph BERT vocab file")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: {what} not found")
    unique = list(dict.fromkeys(texts))
    fingerprint = file_fingerprint(archive, vocab) if cache is not None else ""
    known = load_cache(cache, fingerprint)
    todo = [t for t in unique if t not in known]
    if todo:
        radgraph = load_radgraph(archive, vocab, device)
        known.update(zip(todo, radgraph.annotate(todo, batch_size, progress=len(todo) > batch_size)))
        save_cache(cache, fingerprint, known)
    return {t: known[t] for t in unique}


def radgraph_rewards(
    hyps: list[str], refs: list[str], archive: str, vocab: str, device: str = "cpu", batch_size: int = 32, cache: str | None = None
) -> list[float]:
    """Per report, the partial F1-RadGraph reward of hypothesis against reference. A pair with an
    empty text scores 0 without being annotated, as in the radgraph package."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    pairs = [(h, r) for h, r in zip(hyps, refs) if h and r]
    annotations = annotate_cached([t for pair in pairs for t in pair], archive, vocab, device, batch_size, cache)
    return [partial_reward(annotations[h], annotations[r]) if h and r else 0.0 for h, r in zip(hyps, refs)]
