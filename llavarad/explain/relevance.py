"""Where did the model look? A relevance map over the image patches for every sentence of a report.

After generation, the findings text is teacher-forced: the prompt (with the image) and the text
run through the plain, uncached decoder forward with gradients. For each sentence, the summed
log-probability of its tokens is differentiated with respect to the projected image features
(N patches x dim), and each patch's relevance is

    relevance_i = sum_d  grad_{i,d} * (x_{i,d} - mean_j x_{j,d})

gradient x input with the mean patch as the baseline: the first-order estimate of how much the
sentence's log-probability falls when that patch is replaced by an average patch. Positive:
the patch's content supports the sentence; negative: it speaks against it.

What a map means: which patches the model's own probability of that sentence depends on, locally,
given the whole image. What it does not mean: where the finding is, or that the finding is true.
It is an explanation of this model's computation, not a diagnosis, and a linear estimate of it.

The method was chosen over attention rollout by a deletion test (README: "Explaining a report"):
replacing the patches it ranks highest lowers the sentence's log-probability more than replacing
random patches, and more than rollout's top patches do. Cost: one forward and one backward per
sentence (the forward is shared), after generation, only when asked.
"""

import bisect
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from llavarad.errors import first_line
from llavarad.explain.overlay import crop_box, render
from llavarad.explain.sentences import split_sentences
from llavarad.infer.images import load_image, preprocess
from llavarad.infer.pipeline import prompt_ids
from llavarad.infer.records import Record
from llavarad.model.llava import LlavaRad, image_position
from llavarad.model.prompt import build_question
from llavarad.model.quant import QuantLinear
from llavarad.model.tokenizer import Tokenizer

METHOD = "gradient x (image feature - mean patch feature) of the sentence's summed log-probability"


def gradient_problem(model: LlavaRad) -> str | None:
    """Why this loaded model cannot explain, or None. Explaining needs gradients through the decoder:
    int8 and the plain layouts give them, and so does int4 on a CPU with AVX512 or AVX2 (from
    --quantize int4 or an int4 export: the kernel's tiled layout unpacks); int4 packed for a GPU's
    kernel, or for a CPU with neither, does not."""
    if all(m.gives_gradients for m in model.modules() if isinstance(m, QuantLinear)):
        return None
    where = "a GPU" if model.device.type == "cuda" else "a CPU with neither AVX512 nor AVX2"
    return (f"needs gradients through the decoder, which int4 weights packed for {where} do not give "
            f"(use int8 or no quantization there)")


class TeacherForcing:
    """A prompt + findings text, tokenized as generation sees it, cut into sentences; gives each
    sentence's summed log-probability for any image features."""

    def __init__(self, model: LlavaRad, tokenizer: Tokenizer, question: str, findings: str):
        self.model = model
        prompt = prompt_ids(tokenizer, question)
        self.ids = prompt_ids(tokenizer, question, findings)
        if self.ids[: len(prompt)] != prompt:
            raise ValueError("the findings text changes the prompt's tokens; cannot teacher-force it")
        answer = self.ids[len(prompt) :]
        # The text the tokens spell (the findings, as generation's decode gives them), and where
        # each token ends in it: the decoded length of every prefix.
        self.text = tokenizer.sp.decode(answer)
        ends = [len(tokenizer.sp.decode(answer[: k + 1])) for k in range(len(answer))]
        self.spans = split_sentences(self.text)  # characters
        self.token_spans = _tokens_per_sentence(ends, [b for _, b in self.spans], len(prompt))  # ids indices
        self.image_at = image_position(self.ids)

    def sentences(self) -> list[str]:
        return [self.text[a:b] for a, b in self.spans]

    def logprobs(self, feats: Tensor) -> Tensor:
        """Projected image features (1, N, dim) -> each sentence's summed log-probability (S,), float32 or wider."""
        device = self.model.device
        embeds = self.model.embed([self.ids], feats)[0][None]  # (1, T, dim)
        pos = torch.arange(embeds.shape[1], device=device)[None]  # (1, T)
        h = self.model.llm(embeds, pos)[0]  # (T, dim)
        shift = feats.shape[1] - 1  # ids index j > image -> sequence position j + shift
        out = []
        for a, b in self.token_spans:
            logits = self.model.llm.lm_head(h[a + shift - 1 : b + shift - 1])  # (b - a, V): position t predicts t + 1
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> float32 for the softmax
            target = torch.tensor(self.ids[a:b], device=device)  # (b - a,)
            out.append(logits.log_softmax(-1).gather(-1, target[:, None]).sum())
        return torch.stack(out) if out else torch.zeros(0, device=device)


def _tokens_per_sentence(token_ends: list[int], sentence_ends: list[int], offset: int) -> list[tuple[int, int]]:
    """Token k (ending at character token_ends[k]) belongs to the first sentence ending at or after it;
    -> each sentence's [start, stop) in ids (answer token k is ids[offset + k])."""
    owner = [min(bisect.bisect_left(sentence_ends, e), len(sentence_ends) - 1) for e in token_ends]
    spans = []
    for s in range(len(sentence_ends)):
        ks = [k for k, o in enumerate(owner) if o == s]
        spans.append((offset + ks[0], offset + ks[-1] + 1) if ks else (offset, offset))
    return spans


def gradient_relevance(tf: TeacherForcing, feats: Tensor) -> tuple[Tensor, Tensor]:
    """Image features (1, N, dim) -> relevance (S, N) by gradient x (input - mean patch), and the
    sentences' log-probabilities (S,). One forward; one backward per sentence through it."""
    feats = feats.detach().requires_grad_(True)
    with torch.enable_grad():
        lps = tf.logprobs(feats)  # (S,)
        delta = (feats - feats.mean(1, keepdim=True)).detach().to(lps.dtype)  # (1, N, dim)
        rel = []
        for s in range(len(lps)):
            (grad,) = torch.autograd.grad(lps[s], feats, retain_graph=s < len(lps) - 1)  # (1, N, dim)
            rel.append((grad.to(lps.dtype) * delta).sum(-1)[0])  # (N,)
    return (torch.stack(rel) if rel else delta.new_zeros(0, feats.shape[1])), lps.detach()


@dataclass
class SentenceMap:
    text: str
    chars: tuple[int, int]  # [start, end) in the findings text
    logprob: float  # the sentence's summed token log-probability
    relevance: np.ndarray  # (g, g) signed, over the patch grid of the crop, row-major like the patches
    overlay: Image.Image


@dataclass
class Explanation:
    findings: str
    image_size: tuple[int, int]  # (w, h) of the original image
    crop: tuple[float, float, float, float]  # the crop the model saw, in original pixels
    sentences: list[SentenceMap] = field(default_factory=list)

    def to_json(self, overlay_names: list[str]) -> dict:
        return {
            "findings": self.findings, "method": METHOD, "image_size": list(self.image_size),
            "crop": [round(v, 2) for v in self.crop], "grid": int(self.sentences[0].relevance.shape[0]) if self.sentences else None,
            "sentences": [
                {"text": s.text, "chars": list(s.chars), "logprob": round(s.logprob, 4), "overlay": name,
                 "relevance": np.round(s.relevance, 6).tolist()}
                for s, name in zip(self.sentences, overlay_names)
            ],
        }


def explain(model: LlavaRad, tokenizer: Tokenizer, image: Image.Image, reason: str | None, findings: str) -> Explanation:
    """Per-sentence relevance grids and overlays for `findings`, the report generated for (image, reason)."""
    return explain_question(model, tokenizer, image, build_question(reason), findings)


def explain_question(model: LlavaRad, tokenizer: Tokenizer, image: Image.Image, question: str, findings: str) -> Explanation:
    """`explain` for a record's question (the human turn without the image token)."""
    size = model.tower.cfg.image_size
    grid = size // model.tower.cfg.patch_size
    device = model.device
    with torch.no_grad():
        feats = model.encode_images(preprocess(image, size)[None].to(device))  # (1, N, dim)
    tf = TeacherForcing(model, tokenizer, question, findings)
    rel, lps = gradient_relevance(tf, feats)  # (S, N), (S,)
    out = Explanation(tf.text, image.size, crop_box(*image.size, size))
    for text, chars, r, lp in zip(tf.sentences(), tf.spans, rel.cpu().numpy(), lps.tolist()):
        g = r.reshape(grid, grid)
        out.sentences.append(SentenceMap(text, chars, lp, g, render(image, g, text, size)))
    return out


def file_stem(name: object) -> str:
    """A record id or image name -> a safe file-name stem. A name that had to be changed gets a
    short hash of the original, so ids that differ only in unsafe characters ("a/b", "a_b") never
    share a file."""
    name = str(name)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "report"
    return stem if stem == name else f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def make_folder(path: str | Path) -> Path:
    """Create the output folder now, so a bad path fails before any work: `<path>: <problem>`."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{path}: cannot create the heatmap folder ({first_line(e)})") from None
    return folder


def write_explanation(expl: Explanation, folder: Path, stem: str) -> Path:
    """<stem>_1.png ... one overlay per sentence, then <stem>.json (written last, by rename: its
    presence means the report is done)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k, s in enumerate(expl.sentences, start=1):
        names.append(f"{stem}_{k}.png")
        s.overlay.save(folder / names[-1])
    path, tmp = folder / f"{stem}.json", folder / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(expl.to_json(names)) + "\n")
    tmp.replace(path)
    return path


def explain_predictions(model: LlavaRad, tokenizer: Tokenizer, records: list[Record], image_folder: Path,
                        predictions: dict[str, str], folder: Path, rank: int = 0, world: int = 1) -> int:
    """Explain every record that has a prediction and no <id>.json in `folder` yet (so a rerun
    resumes). Rank r takes every world-th record with a prediction, a split that does not depend
    on how far the other ranks are. Returns how many it explained."""
    done = 0
    for rec in [r for r in records if r.id in predictions][rank::world]:
        stem = file_stem(rec.id)
        if (folder / f"{stem}.json").is_file():
            continue
        expl = explain_question(model, tokenizer, load_image(str(image_folder / rec.image)), rec.question, predictions[rec.id])
        write_explanation(expl, folder, stem)
        done += 1
    return done
