"""Write the Findings section for a chest X-ray.

    python infer.py chest.png [--reason "..."] [--model DIR_OR_REPO] [--base DIR_OR_REPO]

stdout carries only the findings text; logs go to stderr.
"""

import argparse
import sys
import time

import torch

from llavarad.images import load_image
from llavarad.pipeline import describe
from llavarad.weights import load_llavarad

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="chest X-ray: PNG, JPEG or any image PIL reads")
    p.add_argument("--reason", help="reason for exam (indication); omitted -> the no-reason prompt")
    p.add_argument("--model", default="microsoft/llava-rad", help="release folder or Hugging Face repo id")
    p.add_argument("--base", default="lmsys/vicuna-7b-v1.5", help="base Llama folder or Hugging Face repo id")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    try:
        image = load_image(args.image)  # fail on a bad image before loading 7B parameters
        t0 = time.time()
        model, tokenizer = load_llavarad(args.model, args.base, dtype, args.device)
        print(f"loaded model in {time.time() - t0:.1f}s", file=sys.stderr)
        text = describe(model, tokenizer, [image], [args.reason], args.max_new_tokens)[0]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
