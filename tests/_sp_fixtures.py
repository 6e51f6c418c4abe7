"""A tiny Llama-style SentencePiece model trained in a second on radiology-ish text.

Llama's `tokenizer.model` is BPE with byte fallback, `<unk>`=0 `<s>`=1 `</s>`=2, a dummy-prefix
space, identity normalization (no whitespace squashing) and digits split one by one; the tiny
model copies those settings so that every code path of the real one is exercised. It is the
demo's tokenizer (llavarad.demo), so the tests and `python -m llavarad.demo` share one model.
"""

import functools
from pathlib import Path

from llavarad.demo import tokenizer_model

_tiny_sp_model = functools.cache(tokenizer_model)


def train_tiny_sp(folder: Path) -> Path:
    """Write the tiny model as `folder/tokenizer.model` and return its path (trained once per session)."""
    path = Path(folder) / "tokenizer.model"
    path.write_bytes(_tiny_sp_model())
    return path
