"""A BERT encoder (post-LayerNorm, exact GELU) whose parameter names are Hugging Face `BertModel`'s.

CheXbert and RadGraph are BERT checkpoints with task heads; this module is the shared encoder.
Its size is read from the tensors, so the public weights and tiny test weights load the same way.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# In a checkpoint but not needed for the last hidden state: old transformers saved the
# position-id buffer, and the pooler (tanh over [CLS]) is not used by the labelers.
IGNORED_KEYS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str) -> "BertConfig":
        """Sizes from the tensor shapes under `prefix`; heads = hidden // 64 as in every BERT."""

        def shape(name: str) -> torch.Size:
            if prefix + name not in sd:
                raise ValueError(f"BERT checkpoint has no key {prefix + name!r}")
            return sd[prefix + name].shape

        vocab_size, hidden = shape("embeddings.word_embeddings.weight")
        layer_prefix = prefix + "encoder.layer."
        layer_ids = {int(k[len(layer_prefix):].split(".")[0]) for k in sd if k.startswith(layer_prefix)}
        if not layer_ids:
            raise ValueError(f"BERT checkpoint has no keys under {layer_prefix!r}")
        return cls(
            vocab_size=vocab_size,
            hidden=hidden,
            layers=max(layer_ids) + 1,
            heads=max(hidden // 64, 1),
            intermediate=shape("encoder.layer.0.intermediate.dense.weight")[0],
            max_positions=shape("embeddings.position_embeddings.weight")[0],
            type_vocab=shape("embeddings.token_type_embeddings.weight")[0],
        )


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        # Single-segment input: every token has type 0.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)  # (B, T, H)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, H // self.heads).transpose(1, 2) for proj in (self.query, self.key, self.value))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # keep: (B, 1, 1, T) bool
        return y.transpose(1, 2).reshape(B, T, H)


class Output(nn.Module):
    """Linear, residual add, LayerNorm: BERT's `attention.output` and `output` blocks."""

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = Output(cfg.hidden, cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg.intermediate, cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T), mask 1 for real tokens. Returns the last hidden state (B, T, H)."""
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): queries may look at real keys only
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> input_ids and attention_mask, (B, T) each, right-padded with id 0 to the
    longest; `Bert` masks the padding out, so a text's outputs do not depend on its batch."""
    T = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return input_ids, mask


def load_bert(sd: dict, prefix: str) -> Bert:
    """A `Bert` holding the tensors of `sd` under `prefix` (e.g. "module.bert."); keys elsewhere are
    left to the caller. A missing, unknown or mis-shaped key is an error that names it."""
    cfg = BertConfig.from_state_dict(sd, prefix)
    with torch.device("meta"):
        model = Bert(cfg)
    expected = model.state_dict()
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    unknown = sorted(k for k in own if k not in expected and k not in IGNORED_KEYS)
    missing = sorted(k for k in expected if k not in own)
    if unknown or missing:
        problems = [f"missing {prefix}{k}" for k in missing] + [f"unknown {prefix}{k}" for k in unknown]
        raise ValueError(f"BERT checkpoint does not match a {cfg.layers}-layer BERT: " + ", ".join(problems[:5]))
    for k, param in expected.items():
        if own[k].shape != param.shape:
            raise ValueError(f"BERT checkpoint key {prefix}{k} has shape {tuple(own[k].shape)}, expected {tuple(param.shape)}")
    model.load_state_dict({k: own[k].float() for k in expected}, assign=True)
    return model.eval()
