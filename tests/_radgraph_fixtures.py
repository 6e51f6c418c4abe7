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

from _metrics_fixtures import write_vocab

# The radgraph package's word split for the original RadGraph model, verbatim: the reference for ours.
PACKAGE_SPLIT = "(?<! )(?=[/,-,:,.,!?()])|(?<=[/,-,:,.,!?()])(?! )"
ENTITY_LABELS = ["", "ANAT-DP", "OBS-DP", "OBS-U", "OBS-DA"]
RELATION_LABELS = ["modify", "located_at", "suggestive_of"]
FF_LAYERS, FF_HIDDEN, FEATURE_SIZE, MAX_SPAN_WIDTH, SPANS_PER_WORD = 2, 16, 8, 4, 0.5
MAX_LENGTH = 16  # small BERT windows, so that ordinary reports are folded into several
# (mean, spread) of the random output layers' scores per label; the null label scores 0.
NER_SCORES, MENTION_SCORES, RELATION_SCORES = (-1.5, 1.0), (0.0, 0.3), (-3.0, 1.0)


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


def _ff(prefix: str, x: torch.Tensor, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """A feedforward's tensors, and its outputs on the sample inputs x."""
    sd = {}
    for i in range(FF_LAYERS):
        w, b = torch.randn(FF_HIDDEN, x.shape[1], generator=g) / x.shape[1] ** 0.5, 0.5 * torch.randn(FF_HIDDEN, generator=g)
        sd[f"{prefix}._linear_layers.{i}.weight"], sd[f"{prefix}._linear_layers.{i}.bias"] = w, b
        x = torch.relu(x @ w.T + b)
    return sd, x


def _linear(prefix: str, n_out: int, g: torch.Generator, h: torch.Tensor, mean: float, spread: float) -> dict:
    """An output layer whose scores on the sample features h have this mean and spread per label:
    so that some spans are entities and some pairs related, whatever the random draw."""
    weight = torch.randn(n_out, FF_HIDDEN, generator=g)
    scores = h @ weight.T  # (N, n_out)
    weight = weight * (spread / scores.std(0))[:, None]
    return {f"{prefix}.weight": weight, f"{prefix}.bias": mean - scores.mean(0) * spread / scores.std(0)}


def _sample_spans(bert, width: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Span vectors [start word; end word; width] of random token sequences, to set score scales on."""
    ids = torch.randint(5, bert.config.vocab_size, (32, 12), generator=g)
    with torch.no_grad():
        words = bert(input_ids=ids).last_hidden_state.reshape(-1, bert.config.hidden_size)  # (384, H)
    a, b = torch.randint(0, len(words), (2, 1024), generator=g)
    return torch.cat([words[a], words[b], width[torch.randint(0, MAX_SPAN_WIDTH, (1024,), generator=g)]], -1)


def tiny_bert(vocab_size: int, seed: int = 0):
    """A transformers BertModel with random weights (LayerNorms and biases perturbed). Our own, so
    that the head offsets below, set to give a mix of labels, stay right when other fixtures change."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(  # hidden 64 -> 1 head of 64, the rule the BERT loader infers from the tensors
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    bert = BertModel(config).eval()
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return bert


def tiny_state_dict(vocab_size: int, seed: int = 0) -> tuple[dict, "torch.nn.Module"]:
    """weights.th of a tiny model, and the transformers BertModel inside it."""
    bert = tiny_bert(vocab_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    prefix = "_embedder.token_embedder_bert._matched_embedder.transformer_model."
    sd = {prefix + k: v.clone() for k, v in bert.state_dict().items()}
    sd[prefix + "embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
    width = torch.randn(MAX_SPAN_WIDTH, FEATURE_SIZE, generator=g)
    sd["_endpoint_span_extractor._span_width_embedding.weight"] = width
    spans = _sample_spans(bert, width, g)  # (N, span_dim)
    pairs = torch.cat([spans[:512], spans[512:], spans[:512] * spans[512:]], -1)  # (N / 2, 3 * span_dim)
    ner = "_ner._ner_scorers.radgraph__ner_labels"
    pruner = "_relation._mention_pruners.radgraph__relation_labels._scorer"
    ff, h = _ff(f"{ner}.0._module", spans, g)
    sd |= ff | _linear(f"{ner}.1._module", len(ENTITY_LABELS) - 1, g, h, *NER_SCORES)
    ff, h = _ff(f"{pruner}.0._module", spans, g)
    sd |= ff | _linear(f"{pruner}.1._module", 1, g, h, *MENTION_SCORES)
    ff, h = _ff("_relation._relation_feedforwards.radgraph__relation_labels", pairs, g)
    sd |= ff | _linear("_relation._relation_scorers.radgraph__relation_labels", len(RELATION_LABELS), g, h, *RELATION_SCORES)
    # Modules that DyGIE++ builds but RadGraph never runs.
    sd["_coref._distance_embedding.weight"] = torch.randn(10, FEATURE_SIZE, generator=g)
    sd |= _ff("_coref._mention_pruner._scorer.0._module", spans, g)[0]
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
