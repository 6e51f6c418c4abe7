"""A tiny Llama-style SentencePiece model trained in a second on radiology-ish text.

Llama's `tokenizer.model` is BPE with byte fallback, `<unk>`=0 `<s>`=1 `</s>`=2, a dummy-prefix
space, identity normalization (no whitespace squashing) and digits split one by one; the tiny
model copies those settings so that every code path of the real one is exercised.
"""

import functools
import io
from pathlib import Path

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CORPUS = [
    SYSTEM_PROMPT,
    "USER: Provide a description of the findings in the radiology image given the following indication: "
    "Shortness of breath. ASSISTANT:",
    "USER: Provide a description of the findings in the radiology image. ASSISTANT:",
    "Mild cardiomegaly. No focal consolidation, pleural effusion or pneumothorax.",
    "The lungs are clear. The cardiomediastinal silhouette is within normal limits.",
    "Heart size is normal. There is no pulmonary edema.",
    "Left basilar atelectasis. Small right pleural effusion, unchanged since 2019.",
    "Endotracheal tube terminates 4.5 cm above the carina. Nasogastric tube in the stomach.",
    "Right internal jugular central venous catheter tip in the mid SVC.",
    "Moderate pulmonary edema with bilateral perihilar opacities, worse than prior.",
    "Patchy opacity in the right lower lobe concerning for pneumonia in the appropriate clinical setting.",
    "No acute cardiopulmonary process. Degenerative changes of the thoracic spine.",
    "Status post median sternotomy and CABG. Stable mild enlargement of the cardiac silhouette.",
    "Fever, cough; evaluate for pneumonia. History of COPD and 3 prior admissions.",
    "Chest pain, rule out acute process. Patient is 67 years old.",
]


@functools.cache
def _tiny_sp_model() -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=out,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def train_tiny_sp(folder: Path) -> Path:
    """Write the tiny model as `folder/tokenizer.model` and return its path (trained once per session)."""
    path = Path(folder) / "tokenizer.model"
    path.write_bytes(_tiny_sp_model())
    return path
