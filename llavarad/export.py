"""Write one self-contained folder that infer.py and serve.py load in seconds (llavarad.infer.export).

    python -m llavarad.export --model microsoft/llava-rad --base lmsys/vicuna-7b-v1.5 --quantize int4 --output llava-rad-int4
    python infer.py chest.png --model llava-rad-int4
"""

import argparse
import sys
import time

from llavarad.infer.export import export
from llavarad.model.config import DTYPES
from llavarad.model.quant import MODES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="release folder or Hugging Face repo id")
    p.add_argument("--base", required=True, help="base Llama folder or Hugging Face repo id")
    p.add_argument("--tower", help="folder with the tower files, for a release folder without them (as infer.py --tower)")
    p.add_argument("--output", required=True, help="the export folder: absent, empty, or an earlier export (replaced)")
    p.add_argument("--quantize", choices=MODES, help="decoder linear layers in 8 or 4 bits (default: none)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="of the activations and the weights not quantized; what infer.py runs the export in (default: %(default)s)")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        out = export(args.model, args.base, args.output, DTYPES[args.dtype], args.quantize, args.tower)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported to {out} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
