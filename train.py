"""Train LLaVA-Rad: stage 1 ("pretrain", the projector) or stage 2 ("lora", projector + LoRA).

    torchrun --nproc_per_node=4 train.py --stage pretrain --config configs/pretrain.toml \
        --data chat_train_MIMIC_CXR_all_gpt4extract_rulebased_v1.json --image-folder /data/mimic-cxr-jpg/2.0.0/files \
        --base lmsys/vicuna-7b-v1.5 --tower /data/llava-rad --output runs/pretrain
    torchrun --nproc_per_node=4 train.py --stage lora --config configs/lora.toml \
        --projector runs/pretrain/mm_projector.bin ... --output runs/lora

Every setting of the config file can be given as a flag (`global_batch` -> `--global-batch`);
flags win; `--help` explains each. `--resume` continues from the newest checkpoint in the output
folder, with the settings it was saved with: only those that leave the trained weights alone
(logging, validation, checkpoints, workers, activation checkpointing) or the run's length may change.
"""

import sys

from llavarad.dist import close_distributed
from llavarad.train.config import parse_train_args
from llavarad.train.loop import run_training


def main(argv: list[str] | None = None) -> int:
    try:
        run_training(parse_train_args(argv))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
