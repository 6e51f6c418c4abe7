"""A tiny random RadGraph model archive in the layout of the public `radgraph.tar.gz`.

AllenNLP's archive: `config.json` (the training config), `vocabulary/` (one label file per
namespace; "*labels" namespaces are unpadded and the entity file starts with the empty label) and
`weights.th` (the DyGIE++ state dict, BERT under the mismatched embedder, unused coref/event
modules included, BERT's position-id buffer and pooler included as AllenNLP saved them).
"""

import io
import json
import tarfile

import torch

from _metrics_fixtures import random_bert, write_vocab

ENTITY_LABELS = ["", "ANAT-DP", "OBS-DP", "OBS-U", "OBS-DA"]
RELATION_LABELS = ["modify", "located_at", "suggestive_of"]
FF_LAYERS, FF_HIDDEN, FEATURE_SIZE, MAX_SPAN_WIDTH, SPANS_PER_WORD = 2, 16, 8, 4, 0.5
MAX_LENGTH = 16  # small BERT windows, so that ordinary reports are folded into several


def tiny_config(max_length: int = MAX_LENGTH) -> dict:
    """config.json as DyGIE++'s template writes it (only the fields inference reads matter)."""
    bert = {"type": "pretrained_transformer_mismatched", "model_name": "tiny-bert-uncased", "max_length": max_length}
    return {
        "dataset_reader": {"type": "dygie", "token_indexers": {"bert": bert}, "max_span_width": MAX_SPAN_WIDTH},
        "model": {
            "type": "dygie",
            "embedder": {"token_embedders": {"bert": bert}},
            "feature_size": FEATURE_SIZE,
            "max_span_width": MAX_SPAN_WIDTH,
            "target_task": "relation",
            "feedforward_params": {"num_layers": FF_LAYERS, "hidden_dims": FF_HIDDEN, "dropout": 0.4},
            "loss_weights": {"ner": 0.2, "relation": 1.0, "coref": 0.0, "events": 0.0},
            "modules": {
                "coref": {"spans_per_word": 0.3, "max_antecedents": 100, "coref_prop": 0},
                "ner": {},
                "relation": {"spans_per_word": SPANS_PER_WORD},
                "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8},
            },
        },
    }


def _ff(prefix: str, dim_in: int, g: torch.Generator) -> dict:
    sd = {}
    for i in range(FF_LAYERS):
        d = dim_in if i == 0 else FF_HIDDEN
        sd[f"{prefix}._linear_layers.{i}.weight"] = torch.randn(FF_HIDDEN, d, generator=g) / d**0.5
        sd[f"{prefix}._linear_layers.{i}.bias"] = 0.5 * torch.randn(FF_HIDDEN, generator=g)
    return sd


def _linear(prefix: str, n_out: int, g: torch.Generator, scale: float, bias: float) -> dict:
    # Zero-mean rows and near-equal biases: which label wins depends on the input, not on the row.
    weight = torch.randn(n_out, FF_HIDDEN, generator=g)
    return {
        f"{prefix}.weight": scale * (weight - weight.mean(1, keepdim=True)) / FF_HIDDEN**0.5,
        f"{prefix}.bias": 0.2 * torch.randn(n_out, generator=g) + bias,
    }


def tiny_state_dict(vocab_size: int, seed: int = 0) -> tuple[dict, "torch.nn.Module"]:
    """weights.th of a tiny model, and the transformers BertModel inside it."""
    bert = random_bert(vocab_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    span_dim = 2 * bert.config.hidden_size + FEATURE_SIZE
    prefix = "_embedder.token_embedder_bert._matched_embedder.transformer_model."
    sd = {prefix + k: v.clone() for k, v in bert.state_dict().items()}
    sd[prefix + "embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
    sd["_endpoint_span_extractor._span_width_embedding.weight"] = torch.randn(MAX_SPAN_WIDTH, FEATURE_SIZE, generator=g)
    ner, rel = "_ner._ner_scorers.radgraph__ner_labels", "_relation"
    sd |= _ff(f"{ner}.0._module", span_dim, g)
    # Scales and offsets chosen so that some spans are entities and some kept pairs are related.
    sd |= _linear(f"{ner}.1._module", len(ENTITY_LABELS) - 1, g, scale=10.0, bias=-5.0)
    sd |= _ff(f"{rel}._mention_pruners.radgraph__relation_labels._scorer.0._module", span_dim, g)
    sd |= _linear(f"{rel}._mention_pruners.radgraph__relation_labels._scorer.1._module", 1, g, scale=3.0, bias=-1.5)
    sd |= _ff(f"{rel}._relation_feedforwards.radgraph__relation_labels", 3 * span_dim, g)
    sd |= _linear(f"{rel}._relation_scorers.radgraph__relation_labels", len(RELATION_LABELS), g, scale=3.0, bias=-2.0)
    # Modules that DyGIE++ builds but RadGraph never runs.
    sd["_coref._distance_embedding.weight"] = torch.randn(10, FEATURE_SIZE, generator=g)
    sd |= _ff("_coref._mention_pruner._scorer.0._module", span_dim, g)
    sd["_events._distance_embedding.weight"] = torch.randn(10, FEATURE_SIZE, generator=g)
    return sd, bert


def archive_files(sd: dict, config: dict | None = None) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return {
        "config.json": json.dumps(config or tiny_config()).encode(),
        "weights.th": buf.getvalue(),
        "vocabulary/non_padded_namespaces.txt": b"*tags\n*labels\n",
        "vocabulary/radgraph__ner_labels.txt": "".join(f"{x}\n" for x in ENTITY_LABELS).encode(),
        "vocabulary/radgraph__relation_labels.txt": "".join(f"{x}\n" for x in RELATION_LABELS).encode(),
    }


def write_archive(path, files: dict[str, bytes]) -> str:
    """A .tar.gz when `path` ends so, else an unpacked folder."""
    if str(path).endswith(".tar.gz"):
        with tarfile.open(path, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    return str(path)


def tiny_radgraph(tmp_path, seed: int = 0) -> tuple[str, str, dict, "torch.nn.Module"]:
    """(archive .tar.gz, vocab.txt, state dict, transformers BertModel) of a tiny random model."""
    vocab = tmp_path / "vocab.txt"
    tokens = write_vocab(vocab)
    sd, bert = tiny_state_dict(len(tokens), seed)
    archive = write_archive(tmp_path / "radgraph.tar.gz", archive_files(sd))
    return archive, str(vocab), sd, bert
