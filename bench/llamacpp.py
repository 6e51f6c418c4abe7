"""llama.cpp rows of bench/quant_bench.py: the same random base as a GGUF, made by llama.cpp's own
converter and quantizer, timed through llama-cpp-python (pip install -e ".[bench]", which builds
llama.cpp from source: about 450 s on 2 cores). Runs under the Python that has llama_cpp; imports
neither torch nor llavarad.

    python bench/llamacpp.py make --base DIR --src LLAMA_CPP_TREE --type Q4_0      # DIR/gguf/Q4_0.gguf
    python bench/llamacpp.py time --gguf FILE --prompt 128,512,1449 --new 16 --threads 2

`make` converts the base folder (config.json, safetensors, tokenizer.model) to a bf16 GGUF with
SRC/convert_hf_to_gguf.py (SRC: the vendored llama.cpp tree of the llama-cpp-python source
distribution, with its gguf-py), then quantizes it with llama_model_quantize (Q8_0, Q4_0: llama.cpp's
defaults, so Q4_0 keeps the output layer in Q6_K) and, once both exist, deletes the bf16 file. `time` prints one JSON
line per prompt length, in quant_bench's row format.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FTYPES = {"Q8_0": 7, "Q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0


def make(base: Path, src: Path, kind: str, converter_python: str) -> Path:
    import llama_cpp

    out = base / "gguf" / f"{kind}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(exist_ok=True)
    bf16 = out.parent / "bf16.gguf"
    if not bf16.is_file():
        env = os.environ | {"PYTHONPATH": str(src / "gguf-py")}
        subprocess.run([converter_python, str(src / "convert_hf_to_gguf.py"), str(base), "--outtype", "bf16",
                        "--outfile", str(bf16)], check=True, env=env)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(bf16).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"{out}: llama_model_quantize failed")
    if all((out.parent / f"{k}.gguf").is_file() for k in FTYPES):
        bf16.unlink()  # 13.5 GB at 7B
    return out


def time_rows(gguf: Path, prompts: list[int], new: int, threads: int) -> list[dict]:
    """Load (mmap) and, per prompt length, a prefill of random token ids and `new` greedy steps."""
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf), n_ctx=max(prompts) + new + 8, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    load_s = time.perf_counter() - t0
    ctx, vocab = llm.ctx, llm.n_vocab()
    rng = np.random.default_rng(1)

    def last_token() -> int:  # Llama.eval fills no scores without logits_all=True: read the last row
        logits = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    llm.eval(list(rng.integers(3, vocab, 8)))  # untimed: first touches of the mapped weights, thread pools
    rows = []
    for prompt in prompts:
        llm.reset()
        load_avg = os.getloadavg()[0]
        t0 = time.perf_counter()
        llm.eval([int(t) for t in rng.integers(3, vocab, prompt)])
        tokens = [last_token()]
        prefill_s, step_s = time.perf_counter() - t0, []
        for _ in range(new):
            t0 = time.perf_counter()
            llm.eval([tokens[-1]])
            tokens.append(last_token())
            step_s.append(time.perf_counter() - t0)
        rows.append({"row": f"llama.cpp {gguf.stem}", "decoder_bytes": gguf.stat().st_size, "peak_rss_bytes": 0,
                     "peak_anon_bytes": 0, "load_s": load_s, "tower_s": None, "prompt": prompt, "prefill_s": prefill_s,
                     "new": new, "decode_tok_s": 1 / statistics.median(step_s),
                     "load_avg": [load_avg, os.getloadavg()[0]], "tokens": tokens})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--base", required=True)
    m.add_argument("--src", required=True, help="llama.cpp source tree with convert_hf_to_gguf.py and gguf-py/")
    m.add_argument("--type", choices=sorted(FTYPES), required=True)
    m.add_argument("--converter-python", default=sys.executable, help="a Python with torch, numpy, sentencepiece (the converter's needs)")
    t = sub.add_parser("time")
    t.add_argument("--gguf", required=True)
    t.add_argument("--prompt", required=True, help="comma-separated prompt lengths")
    t.add_argument("--new", type=int, default=16)
    t.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    if args.command == "make":
        print(make(Path(args.base), Path(args.src), args.type, args.converter_python))
    else:
        rows = time_rows(Path(args.gguf), [int(n) for n in args.prompt.split(",")], args.new, args.threads)
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
