"""Weight-only quantization at the 7B shape on the CPU: bf16, int8 and int4 decoders (ours) and
transformers' LlamaForCausalLM in bf16 (the peer row), all on the same random weights.

    python bench/quant_bench.py --dir /tmp/vicuna-shape --prompt 128 --new 16 --json quant.json
    python bench/quant_bench.py --tiny --dir /tmp/tiny-shape    # seconds: the test's smoke run

The first run writes random bf16 weights in the layout of lmsys/vicuna-7b-v1.5 (config.json, 2 GB
safetensors shards and their index) to --dir; later runs reuse them. Each row then runs in its own
process, one after the other (the bf16 rows hold 13.5 GB), and reports:
  - decoder bytes: every parameter and buffer of the loaded decoder (no KV cache);
  - peak memory while loading: the process's peak resident set (VmHWM, which also counts the pages
    of the memory-mapped safetensors shard being read: page cache the kernel can drop) and its peak
    anonymous memory (RssAnon, sampled every 10 ms: what the process really holds);
  - load time: reading, merging nothing (no adapter), quantizing, assigning;
  - prefill seconds for one prompt of --prompt tokens (random input embeddings), the first token included;
  - decode tokens/s at batch 1: --new greedy steps over the KV cache after the prefill, 1 / the median step;
both after an untimed 8-token prefill and 2 steps (first touches of the memory-mapped weights).
Then one block's 7 matrices, and lm_head, alone in bf16, int8 and int4, the formats taking turns
(kernel_rows): bytes and time per token, ratios that a shared machine's load does not skew.
--tiny runs a 2-layer decoder in-process (timings mean nothing; the test checks the byte counts).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llavarad.infer.generate import decode_step, prefill
from llavarad.model.config import LlamaConfig
from llavarad.model.quant import QuantLinear
from llavarad.model.weights import load_llm

ROWS = {"bf16": None, "int8": "int8", "int4": "int4", "transformers bf16": None}
TINY = LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=256)
SHARD_BYTES = 2 * 10**9


def hf_config(cfg: LlamaConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim, "num_attention_heads": cfg.n_heads, "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Llama checkpoint, in file order."""
    kv = cfg.n_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (cfg.dim,), p + "post_attention_layernorm.weight": (cfg.dim,),
            p + "self_attn.q_proj.weight": (cfg.dim, cfg.dim), p + "self_attn.k_proj.weight": (kv, cfg.dim),
            p + "self_attn.v_proj.weight": (kv, cfg.dim), p + "self_attn.o_proj.weight": (cfg.dim, cfg.dim),
            p + "mlp.gate_proj.weight": (cfg.hidden_dim, cfg.dim), p + "mlp.up_proj.weight": (cfg.hidden_dim, cfg.dim),
            p + "mlp.down_proj.weight": (cfg.dim, cfg.hidden_dim),
        }
    return shapes | {"model.norm.weight": (cfg.dim,), "lm_head.weight": (cfg.vocab_size, cfg.dim)}


def write_random_base(folder: Path, cfg: LlamaConfig) -> None:
    """Random bf16 weights (std 0.02, norms 1) in sharded safetensors files; kept for later runs."""
    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for key, shape in hf_shapes(cfg).items():
        t = torch.ones(shape) if "norm" in key else torch.randn(shape, generator=g) * 0.02
        shard[key] = t.to(torch.bfloat16)
        size += shard[key].nbytes
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (folder / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


class PeakMemory:
    """Samples this process's anonymous resident memory every 10 ms in a thread; VmHWM is the kernel's own peak."""

    def __init__(self):
        self.peak_anon, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, status_bytes("RssAnon"))
            time.sleep(0.01)

    def stop(self) -> tuple[int, int]:
        """(peak RSS, peak anonymous RSS) in bytes."""
        self._stop.set()
        self._thread.join()
        return status_bytes("VmHWM"), max(self.peak_anon, status_bytes("RssAnon"))


def status_bytes(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024


def run_row(row: str, folder: Path, prompt: int, new: int) -> dict:
    """Load one decoder and time it; see the module docstring."""
    memory, t0 = PeakMemory(), time.perf_counter()
    if row.startswith("transformers"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    else:
        model = load_llm(folder, torch.bfloat16, "cpu", quantize=ROWS[row])
    load_s = time.perf_counter() - t0
    peak_rss, peak_anon = memory.stop()
    decoder_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    dim = model.config.hidden_size if row.startswith("transformers") else model.cfg.dim
    embeds = (torch.randn(1, prompt, dim, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    with torch.no_grad():
        generate(model, row, embeds[:, :8], 2)  # untimed: first touches of the memory-mapped weights, thread pools
        load_avg = os.getloadavg()[0]
        prefill_s, step_s, tokens = generate(model, row, embeds, new)
    return {"row": row, "decoder_bytes": decoder_bytes, "peak_rss_bytes": peak_rss, "peak_anon_bytes": peak_anon,
            "load_s": load_s, "prompt": prompt, "prefill_s": prefill_s, "new": new,
            "decode_tok_s": 1 / statistics.median(step_s), "load_avg": [load_avg, os.getloadavg()[0]], "tokens": tokens}


def generate(model, row: str, embeds: torch.Tensor, new: int) -> tuple[float, list[float], list[int]]:
    """Prefill embeds (1, T, dim), then `new` greedy steps -> (prefill seconds, seconds of each step, tokens).
    A step's median makes the tok/s figure: the 2 cores are shared, and a busy neighbour slows some steps."""
    T = embeds.shape[1]
    t0 = time.perf_counter()
    if row.startswith("transformers"):
        out = model(inputs_embeds=embeds, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)  # (1,)
    else:
        cache = model.new_cache(1, T + new + 1)
        token = prefill(model, cache, [embeds[0]])
    prefill_s, tokens, step_s = time.perf_counter() - t0, [token.item()], []
    for i in range(new):
        t0 = time.perf_counter()
        if row.startswith("transformers"):
            out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
        else:
            token = decode_step(model, cache, token, torch.tensor([T + i]))
        tokens.append(token.item())
        step_s.append(time.perf_counter() - t0)
    return prefill_s, step_s, tokens


def kernel_rows(cfg: LlamaConfig, repeats: int = 15) -> list[dict]:
    """One block's 7 weight matrices, and lm_head, at batch 1 in bf16, int8 and int4: bytes and the
    median time per token. The formats take turns within each repeat, so a busy neighbour slows them
    alike: the ratios hold even when the full-model rows, minutes apart, saw different loads."""
    g, kv = torch.Generator().manual_seed(2), cfg.n_kv_heads * cfg.head_dim
    parts = {"block": [(cfg.dim, cfg.dim), (kv, cfg.dim), (kv, cfg.dim), (cfg.dim, cfg.dim),
                       (cfg.hidden_dim, cfg.dim), (cfg.hidden_dim, cfg.dim), (cfg.dim, cfg.hidden_dim)],
             "lm_head": [(cfg.vocab_size, cfg.dim)]}
    rows = []
    for part, shapes in parts.items():
        ws = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for s in shapes]
        layers = {"bf16": [lambda h, w=w: F.linear(h, w) for w in ws],
                  **{m: [QuantLinear.from_float(w, m, torch.bfloat16, "cpu") for w in ws] for m in ("int8", "int4")}}
        size = {"bf16": sum(w.nbytes for w in ws),
                **{m: sum(q.weight.nbytes + q.scales.nbytes for q in layers[m]) for m in ("int8", "int4")}}
        times = {m: [] for m in layers}
        with torch.no_grad():
            for _ in range(repeats + 1):
                for mode, fns in layers.items():
                    xs = [torch.randn(1, w.shape[1]).to(torch.bfloat16) for w in ws]
                    t0 = time.perf_counter()
                    for fn, x in zip(fns, xs):
                        fn(x)
                    times[mode].append(time.perf_counter() - t0)
        rows += [{"part": part, "mode": m, "bytes": size[m], "ms": 1e3 * statistics.median(t[1:])} for m, t in times.items()]
    return rows


def table(results: list[dict]) -> str:
    lines = ["| row | decoder GB | peak RSS GB (anon) while loading | load s | prefill s | decode tok/s | x bf16 | tokens = bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    ref = next((r for r in results if r["row"] == "bf16"), results[0])
    for r in results:
        same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"])) if a != b), len(r["tokens"]))
        lines.append(f"| {r['row']} | {r['decoder_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} ({r['peak_anon_bytes'] / 1e9:.2f}) | "
                     f"{r['load_s']:.1f} | {r['prefill_s']:.1f} ({r['prompt']} tokens) | {r['decode_tok_s']:.2f} | "
                     f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f} | first {same} of {len(r['tokens'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder of the random checkpoint (written on the first run)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    p.add_argument("--prompt", type=int, default=1449, help="prefill length (1449: LLaVA-Rad's prompt)")
    p.add_argument("--new", type=int, default=16, help="decode steps timed")
    p.add_argument("--tiny", action="store_true", help="a 2-layer decoder, rows in this process")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--kernels-only", action="store_true", help="only the per-block and lm_head rows")
    p.add_argument("--one-row", help=argparse.SUPPRESS)  # the child process of one row
    args = p.parse_args(argv)
    folder = Path(args.dir)
    if args.one_row:
        print(json.dumps(run_row(args.one_row, folder, args.prompt, args.new)))
        return 0
    rows = [] if args.kernels_only else args.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {unknown}")
    write_random_base(folder, TINY if args.tiny else LlamaConfig())
    results = []
    for row in rows:
        if args.tiny:
            results.append(run_row(row, folder, args.prompt, args.new))
        else:
            cmd = [sys.executable, __file__, "--dir", str(folder), "--prompt", str(args.prompt), "--new", str(args.new), "--one-row", row]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{row}: FAILED\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(done.stdout.splitlines()[-1]))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "tokens"}), file=sys.stderr, flush=True)
    if results:
        print(table(results))
    kernels = kernel_rows(TINY if args.tiny else LlamaConfig())
    print("\n".join(f"{r['part']} {r['mode']}: {r['bytes'] / 1e6:.1f} MB, {r['ms']:.2f} ms per token" for r in kernels))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": results, "kernels": kernels}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
