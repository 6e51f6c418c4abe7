"""The deletion test of a relevance map: does removing the patches it ranks highest hurt the
sentence more than removing random patches?

"Removing" a patch sets its projected feature to the image's mean patch feature (the baseline the
gradient x input maps are taken against). For a fraction f of the N patches, a sentence's drop is
its log-probability with the full image minus its log-probability with k = round(f * N) patches
removed: the k it ranks highest, or k random ones (the mean drop over `n_random` draws; the same
draws for every sentence). A faithful map has a larger drop for its top patches, at every f.
"""

import torch
from torch import Tensor

from llavarad.explain.relevance import TeacherForcing


@torch.no_grad()
def deletion_drops(tf: TeacherForcing, feats: Tensor, relevance: Tensor, fraction: float, n_random: int,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Image features (1, N, dim), relevance (S, N) -> each sentence's drop (S,) with its top
    patches removed, and its mean drop (S,) with random patches removed."""
    N = feats.shape[1]
    k = max(1, round(fraction * N))
    mean = feats.mean(1)  # (1, dim)
    full = tf.logprobs(feats)  # (S,)
    top = []
    for s in range(relevance.shape[0]):
        x = feats.clone()
        x[0, relevance[s].topk(k).indices] = mean
        top.append(full[s] - tf.logprobs(x)[s])
    random = torch.zeros_like(full)
    for _ in range(n_random):
        x = feats.clone()
        x[0, torch.randperm(N, generator=generator)[:k]] = mean
        random += (full - tf.logprobs(x)) / n_random
    return torch.stack(top), random
