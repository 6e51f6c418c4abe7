"""All the parallelism in one place: activation checkpointing and FSDP2 on each decoder block, then
FSDP2 on the root (tower, projector, embeddings, final norm, lm_head)."""

from functools import partial

import torch
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from llavarad.train.model import TrainModel

# Kept by "selective" checkpointing: the outputs of the expensive ops of a block, its matmuls and
# attention; the backward recomputes only the cheap elementwise ops (norms, RoPE, SiLU, dropout).
# A matmul over a short contraction (LoRA's B, r wide) is cheaper to redo than its (tokens, out)
# output is to keep, so it is recomputed too.
_SAVE = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
_SHORT_CONTRACTION = 256


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVE or (op is torch.ops.aten.mm.default and args[0].shape[-1] > _SHORT_CONTRACTION):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def parallelize(model: TrainModel, checkpointing: str) -> None:
    """In place. `checkpointing`: "full" keeps only each block's input and recomputes the block in
    the backward; "selective" also keeps the matmul outputs; "none" keeps everything."""
    for block in model.llm.layers:
        if checkpointing == "full":
            checkpoint(block)
        elif checkpointing == "selective":
            checkpoint(block, context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls))
        fully_shard(block)
    fully_shard(model)

