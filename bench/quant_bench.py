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
  - load time: reading, merging nothing (no adapter), quantizing, assigning; for an export, mapping it;
  - export rows: the tower + projector's seconds for one 518 px image;
  - for each --prompt length: prefill seconds for one prompt of that many tokens (random input
    embeddings; llama.cpp: random token ids), the first token included, and decode tokens/s at batch
    1 after it: --new greedy steps over the KV cache, 1 / the median step;
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
from PIL import Image
from safetensors.torch import save_file

from llavarad.demo import TINY_TOWER, tokenizer_model, write_tower, xray_like
from llavarad.infer.export import export, load_export
from llavarad.infer.generate import decode_step, prefill
from llavarad.infer.images import preprocess
from llavarad.model.config import LlamaConfig, LoRAConfig
from llavarad.model.llava import Projector
from llavarad.model.quant import QuantLinear
from llavarad.model.vision import VisionConfig
from llavarad.model.weights import load_llm
from llavarad.train.release import save_lora_release

ROWS = {"bf16": None, "int8": "int8", "int4": "int4", "transformers bf16": None,
        "export bf16": None, "export int8": "int8", "export int4": "int4", "llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_0": "Q4_0"}
DEFAULT_ROWS = ["bf16", "int8", "int4", "transformers bf16"]
BENCH_LORA = LoRAConfig(r=16, alpha=32.0)
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
    write_tokenizer(folder / "tokenizer.model", cfg.vocab_size)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def write_tokenizer(path: Path, pieces: int) -> None:
    """The demo's SentencePiece model (Llama's settings) padded with never-used pieces to `pieces`, the
    vocabulary of the random decoder: our tokenizer and llama.cpp's converter both read it."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(tokenizer_model())
    for i in range(len(model.pieces), pieces):
        model.pieces.add(piece=f"\u2581unused{i}", score=-1e4 - i)
    path.write_bytes(model.SerializeToString())


def block_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """One decoder block's 7 linear layers: {module under the block: (out, in)}."""
    kv = cfg.n_kv_heads * cfg.head_dim
    return {"attn.q_proj": (cfg.dim, cfg.dim), "attn.k_proj": (kv, cfg.dim), "attn.v_proj": (kv, cfg.dim),
            "attn.o_proj": (cfg.dim, cfg.dim), "mlp.gate_proj": (cfg.hidden_dim, cfg.dim),
            "mlp.up_proj": (cfg.hidden_dim, cfg.dim), "mlp.down_proj": (cfg.dim, cfg.hidden_dim)}


def write_random_release(base: Path, tiny: bool) -> Path:
    """base/release: a random tower (the release's shape; tiny: the demo's), projector and LoRA adapter,
    saved by the training code's writer; kept for later runs."""
    folder = base / "release"
    if (folder / "config.json").is_file():
        return folder
    cfg = LlamaConfig.from_hf(base / "config.json")
    tower = write_tower(folder, cfg=TINY_TOWER if tiny else VisionConfig())
    g = torch.Generator().manual_seed(3)
    projector = {k: v.detach() for k, v in Projector(tower.cfg.width, cfg.dim).state_dict().items()}
    adapter = {}
    for i in range(cfg.n_layers):
        for module, (n, k) in block_shapes(cfg).items():
            adapter[f"layers.{i}.{module}.lora_A"] = torch.randn(BENCH_LORA.r, k, generator=g) * 0.01
            adapter[f"layers.{i}.{module}.lora_B"] = torch.randn(n, BENCH_LORA.r, generator=g) * 0.01
    save_lora_release(folder, projector, adapter, BENCH_LORA, base, "lmsys/vicuna-7b-v1.5", folder)
    return folder


def export_folder(base: Path, mode: str | None) -> Path:
    return base / f"export-{mode or 'bf16'}"


def make_export(base: Path, mode: str | None, tiny: bool) -> dict:
    """python -m llavarad.export of the random release, timed, with its peak memory; nothing when it exists."""
    out = export_folder(base, mode)
    if (out / "manifest.json").is_file():
        return {}
    release = write_random_release(base, tiny)
    memory, t0 = PeakMemory(), time.perf_counter()
    export(str(release), str(base), out, torch.bfloat16, mode)
    peak_rss, peak_anon = memory.stop()
    return {"export": mode or "bf16", "export_s": time.perf_counter() - t0, "peak_rss_bytes": peak_rss,
            "peak_anon_bytes": peak_anon, "load_avg": os.getloadavg()[0]}


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


def run_row(row: str, folder: Path, prompts: list[int], new: int) -> list[dict]:
    """Load one decoder and time it at each prompt length; see the module docstring."""
    memory, t0 = PeakMemory(), time.perf_counter()
    tower_s = None
    if row.startswith("transformers"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    elif row.startswith("export"):
        llava, _ = load_export(export_folder(folder, ROWS[row]), "cpu")
        model = llava.llm
    else:
        model = load_llm(folder, torch.bfloat16, "cpu", quantize=ROWS[row])
    load_s = time.perf_counter() - t0
    peak_rss, peak_anon = memory.stop()
    decoder_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    dim = model.config.hidden_size if row.startswith("transformers") else model.cfg.dim
    embeds = (torch.randn(1, max(prompts), dim, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    results = []
    with torch.no_grad():
        if row.startswith("export"):
            pixels = preprocess(Image.fromarray((xray_like(0) * 255).astype("uint8")), llava.tower.cfg.image_size)
            t0 = time.perf_counter()
            llava.encode_images(pixels[None])  # (1, N, dim)
            tower_s = time.perf_counter() - t0
        generate(model, row, embeds[:, :8], 2)  # untimed: first touches of the memory-mapped weights, thread pools
        for prompt in prompts:
            load_avg = os.getloadavg()[0]
            prefill_s, step_s, tokens = generate(model, row, embeds[:, :prompt], new)
            results.append({"row": row, "decoder_bytes": decoder_bytes, "peak_rss_bytes": peak_rss, "peak_anon_bytes": peak_anon,
                            "load_s": load_s, "tower_s": tower_s, "prompt": prompt, "prefill_s": prefill_s, "new": new,
                            "decode_tok_s": 1 / statistics.median(step_s), "load_avg": [load_avg, os.getloadavg()[0]],
                            "tokens": tokens})
    return results


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
    g = torch.Generator().manual_seed(2)
    parts = {"block": list(block_shapes(cfg).values()), "lm_head": [(cfg.vocab_size, cfg.dim)]}
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


def prefill_kernel_rows(cfg: LlamaConfig, prompts: list[int], repeats: int) -> list[dict]:
    """One block's 7 weight matrices at each prompt length: bf16's matmul, the int8 / int4 packed
    kernels, and the int8 / int4 layers as they run (from DENSE_ROWS rows: dequantized, then the
    dense matmul), taking turns. Per mode the median and best seconds, and the median (and range) of
    its time over bf16's in the same repeat: on a shared machine bf16's own time moves 2x between
    repeats, and a ratio within one repeat does not. x 32 blocks ~ a prefill's linear layers."""
    g = torch.Generator().manual_seed(2)
    ws = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for s in block_shapes(cfg).values()]
    q = {m: [QuantLinear.from_float(w, m, torch.bfloat16, "cpu") for w in ws] for m in ("int8", "int4")}
    fns = {"bf16": [lambda x, w=w: F.linear(x, w) for w in ws],
           "int8 packed kernel": [lambda x, l=l: torch._weight_int8pack_mm(x, l.weight, l.scales) for l in q["int8"]],
           "int4 packed kernel": [lambda x, l=l: torch._weight_int4pack_mm_for_cpu(x, l.weight, l.group, l.scales) for l in q["int4"]],
           "int8": [l.matmul for l in q["int8"]], "int4": [l.matmul for l in q["int4"]]}
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            times = {m: [] for m in fns}
            load_avg = os.getloadavg()[0]
            for _ in range(repeats):
                for mode, layer_fns in fns.items():
                    xs = [torch.randn(prompt, w.shape[1], generator=g).to(torch.bfloat16) for w in ws]
                    t0 = time.perf_counter()
                    for fn, x in zip(layer_fns, xs):
                        fn(x)
                    times[mode].append(time.perf_counter() - t0)
            for m, t in times.items():
                ratios = [a / b for a, b in zip(t, times["bf16"])]
                rows.append({"prompt": prompt, "mode": m, "s": statistics.median(t), "best_s": min(t),
                             "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                             "load_avg": [load_avg, os.getloadavg()[0]]})
    return rows


def table(results: list[dict]) -> str:
    lines = ["| row | decoder GB | peak RSS GB (anon) while loading | load s | tower s | prompt | prefill s | decode tok/s | "
             "x bf16 | tokens = bf16 | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    def first(names: tuple[str, ...], prompt: int) -> dict | None:
        return next((b for b in results if b["row"] in names and b["prompt"] == prompt), None)

    for r in results:
        # speed against a bf16 decoder of the same shape; tokens against the same weights in bf16 (the
        # export rows run the release, LoRA merged: "export bf16"); blank where that row did not run
        speed = first(("bf16", "export bf16"), r["prompt"])
        same_model = first(("export bf16",) if r["row"].startswith("export") else ("bf16",), r["prompt"])
        if same_model is None or r["row"].startswith("llama.cpp"):  # llama.cpp: token ids, not embeddings
            same = ""
        else:
            n = next((i for i, (a, b) in enumerate(zip(r["tokens"], same_model["tokens"])) if a != b), len(r["tokens"]))
            same = f"first {n} of {len(r['tokens'])}"
        ratio = "" if speed is None else f"{r['decode_tok_s'] / speed['decode_tok_s']:.2f}"
        tower = "" if r.get("tower_s") is None else f"{r['tower_s']:.1f}"
        memory = f"{r['peak_rss_bytes'] / 1e9:.2f} ({r['peak_anon_bytes'] / 1e9:.2f})" if r["peak_rss_bytes"] else ""  # llama.cpp: not sampled
        lines.append(f"| {r['row']} | {r['decoder_bytes'] / 1e9:.2f} | {memory} | "
                     f"{r['load_s']:.1f} | {tower} | {r['prompt']} | {r['prefill_s']:.1f} | {r['decode_tok_s']:.2f} | "
                     f"{ratio} | {same} | {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f} |")
    return "\n".join(lines)


def one_row(row: str, args: argparse.Namespace) -> list[dict]:
    """A row in its own process (in this one with --tiny): ours, or llama.cpp under --llama-python."""
    folder = Path(args.dir)
    if row.startswith("llama.cpp"):
        here = Path(__file__).parent / "llamacpp.py"
        gguf = subprocess.run([args.llama_python, str(here), "make", "--base", str(folder), "--src", str(args.llama_src),
                               "--type", ROWS[row], "--converter-python", sys.executable], check=True,
                              capture_output=True, text=True).stdout.split()[-1]
        cmd = [args.llama_python, str(here), "time", "--gguf", gguf, "--prompt", args.prompt, "--new", str(args.new)]
    elif args.tiny:
        return run_row(row, folder, [int(n) for n in args.prompt.split(",")], args.new)
    else:
        cmd = [sys.executable, __file__, "--dir", str(folder), "--prompt", args.prompt, "--new", str(args.new), "--one-row", row]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{row}: FAILED\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder of the random checkpoint (written on the first run)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    p.add_argument("--prompt", default="1449", help="prefill lengths, comma-separated (1449: LLaVA-Rad's prompt)")
    p.add_argument("--new", type=int, default=16, help="decode steps timed")
    p.add_argument("--rounds", type=int, default=1, help="the rows take turns this many times")
    p.add_argument("--tiny", action="store_true", help="a 2-layer decoder, rows in this process")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--kernels", default="decode", help="per-block rows: decode (batch 1), prefill (at --prompt), both, none")
    p.add_argument("--kernel-repeats", type=int, default=9, help="repeats of the prefill per-block rows (the formats take turns)")
    p.add_argument("--llama-python", default=sys.executable, help="a Python with llama_cpp, for the llama.cpp rows")
    p.add_argument("--llama-src", help="llama.cpp source tree (the llama-cpp-python sdist's vendor/llama.cpp), for the converter")
    p.add_argument("--one-row", help=argparse.SUPPRESS)  # the child process of one row
    args = p.parse_args(argv)
    folder, prompts = Path(args.dir), [int(n) for n in args.prompt.split(",")]
    if args.one_row:
        print(json.dumps(run_row(args.one_row, folder, prompts, args.new)))
        return 0
    rows = args.rows.split(",") if args.rows else []
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {unknown}")
    if any(r.startswith("llama.cpp") for r in rows) and not args.llama_src:
        p.error("the llama.cpp rows need --llama-src")
    cfg = TINY if args.tiny else LlamaConfig()
    write_random_base(folder, cfg)
    exports = [make_export(folder, ROWS[r], args.tiny) for r in dict.fromkeys(rows) if r.startswith("export")]
    for e in filter(None, exports):
        print(json.dumps(e), file=sys.stderr, flush=True)
    results = []
    for _ in range(args.rounds):
        for row in rows:
            try:
                results += one_row(row, args)
            except RuntimeError as e:
                print(e, file=sys.stderr)
                continue
            for r in results[-len(prompts):]:
                print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), file=sys.stderr, flush=True)
    if results:
        print(table(results))
    kernels = kernel_rows(cfg) if args.kernels in ("decode", "both") else []
    print("\n".join(f"{r['part']} {r['mode']}: {r['bytes'] / 1e6:.1f} MB, {r['ms']:.2f} ms per token" for r in kernels))
    prefill_kernels = prefill_kernel_rows(cfg, prompts, args.kernel_repeats) if args.kernels in ("prefill", "both") else []
    print("\n".join(f"one block, {r['prompt']} rows, {r['mode']}: median {r['s'] * 1e3:.0f} ms, best {r['best_s'] * 1e3:.0f} ms, "
                    f"{r['ratio']:.2f}x bf16 ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) "
                    f"(load {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f})" for r in prefill_kernels))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": results, "exports": [e for e in exports if e], "kernels": kernels,
                                               "prefill_kernels": prefill_kernels}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
