"""Serving benchmark: serve.py under closed-loop and open-loop load, against infer.py --query-file on the
same images at the same batch size, in one run.

    python bench/serve_bench.py --model /data/llava-rad --base /data/vicuna-7b-v1.5 \
        --images /data/cxr-sample --batch-size 32 --max-tokens 128          # on a GPU
    python bench/serve_bench.py --model REL --base BASE --tiny  # CPU smoke test, seconds

What it does, in order:
  1. starts serve.py (or uses --url, a server already running with the same options);
  2. closed loop at each --concurrency (default 1, 8, 32): that many clients, each sending its next
     streamed request as soon as the last one ended, --requests requests in all;
  3. open loop: --requests requests at Poisson arrival times of --rate per second (seed 0);
  4. stops the server and runs `infer.py --query-file` over the same images and reasons (greedy, the same
     max tokens, the same batch size) and reads its reports/s;
  5. loads the model once more in this process and times one prefill (image encoding + prefill of one
     prompt, median of 5) as the reference for time to first token.
Per load: requests/s, time to first token (request sent -> first content chunk) p50/p99, inter-token
latency (gaps between content chunks) p50/p99. Every request is greedy, so the server's texts must equal
infer.py's: a difference is reported as MISMATCH. Goals on a GPU: at concurrency 32, at least 90% of the
offline reports/s; at concurrency 1, time to first token within 1.5x of one prefill.
--tiny: CPU, float32, 4 rows, 8 tokens, concurrency 1 and 4, 8 requests, no image workers: checks the script, not the speed.
"""

import argparse
import base64
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
REASONS = [None, "Shortness of breath.", "Evaluate for pneumonia.", "Chest pain, rule out acute process.", "Line placement."]


@dataclass
class Timing:
    ttft: float  # seconds from sending to the first content chunk
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks
    text: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="release folder")
    p.add_argument("--base", required=True, help="base Llama folder")
    p.add_argument("--images", help="folder of PNG / JPEG / DICOM images (default: random PNGs)")
    p.add_argument("--url", help="a serve.py already running with the same options (default: start one)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=128, help="requests per load")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop client counts")
    p.add_argument("--rate", type=float, default=4.0, help="open-loop requests per second")
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--workers", type=int, default=4, help="infer.py's image-decoding workers")
    p.add_argument("--json", help="write the rows and checks here")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 4 rows, 8 tokens, 8 requests, concurrency 1,4")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch_size, args.max_tokens, args.requests, args.concurrency, args.rate, args.device, args.workers = 4, 8, 8, "1,4", 20.0, "cpu", 0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def image_files(args: argparse.Namespace, tmp: Path) -> list[Path]:
    if args.images:
        files = sorted(f for f in Path(args.images).rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
        if not files:
            raise SystemExit(f"error: {args.images}: no PNG, JPEG or DICOM files")
        return files
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(16):
        files.append(tmp / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (600, 520), dtype=np.uint8)).save(files[-1])
    return files


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(ROOT / "serve.py"), "--model", args.model, "--base", args.base, "--device", args.device, "--port", "0",
           "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_tokens), "--max-queue", str(max(args.requests, 64))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)

    def drain() -> None:  # the server logs a line per request: keep its pipe from filling up
        for _ in proc.stderr:
            pass

    for line in proc.stderr:
        if m := re.search(r"serving \S+ on (http://\S+)", line):
            threading.Thread(target=drain, daemon=True).start()
            return proc, m.group(1)
    raise SystemExit(f"error: serve.py exited with {proc.wait()} before serving")


def request(url: str, body: dict) -> Timing:
    """One streamed request, timed chunk by chunk."""
    start = time.perf_counter()
    timing, last = None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if not piece:
                continue
            now = time.perf_counter()
            if timing is None:
                timing = Timing(now - start)
            else:
                timing.gaps.append(now - last)
            timing.text += piece
            last = now
    return timing or Timing(time.perf_counter() - start)


def work_list(files: list[Path], n: int) -> list[tuple[Path, str | None]]:
    """Request i: image i mod len(files), reason i mod len(REASONS); every load sends the same list."""
    return [(files[i % len(files)], REASONS[i % len(REASONS)]) for i in range(n)]


def bodies(work: list[tuple[Path, str | None]], max_tokens: int) -> list[tuple[int, dict]]:
    """(request index, streamed chat-completions body) per request."""
    urls = {f: f"data:application/octet-stream;base64,{base64.b64encode(f.read_bytes()).decode()}" for f, _ in work}
    out = []
    for i, (image, reason) in enumerate(work):
        content = [{"type": "image_url", "image_url": {"url": urls[image]}}]
        if reason:
            content.append({"type": "text", "text": reason})
        out.append((i, {"model": "llava-rad", "stream": True, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}))
    return out


def closed_loop(url: str, work: list[tuple[int, dict]], clients: int) -> tuple[float, list[tuple[int, Timing]]]:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:  # each worker sends its next request when the last one ends
        timings = list(pool.map(lambda w: (w[0], request(url, w[1])), work))
    return time.perf_counter() - start, timings


def open_loop(url: str, work: list[tuple[int, dict]], rate: float) -> tuple[float, list[tuple[int, Timing]]]:
    rng = random.Random(0)
    arrivals, t = [], 0.0
    for _ in work:
        arrivals.append(t)
        t += rng.expovariate(rate)
    start = time.perf_counter()

    def timed(i: int) -> tuple[int, Timing]:
        time.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        return work[i][0], request(url, work[i][1])

    with ThreadPoolExecutor(len(work)) as pool:
        timings = list(pool.map(timed, range(len(work))))
    return time.perf_counter() - start, timings


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def row(name: str, seconds: float, timings: list[tuple[int, Timing]]) -> dict:
    ttft = [t.ttft for _, t in timings]
    gaps = [g for _, t in timings for g in t.gaps]
    return {"load": name, "requests": len(timings), "requests_per_s": len(timings) / seconds,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99)}


def offline(args: argparse.Namespace, work: list[tuple[Path, str | None]], tmp: Path) -> tuple[float, dict[int, str]]:
    """infer.py --query-file over the same requests -> (reports/s, prediction per request index)."""
    queries = tmp / "queries.jsonl"
    lines = [{"id": str(i), "image": str(image.resolve()), **({"reason": reason} if reason else {})} for i, (image, reason) in enumerate(work)]
    queries.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp / "preds.jsonl"
    cmd = [sys.executable, str(ROOT / "infer.py"), "--query-file", str(queries), "--image-folder", "/", "--output", str(out), "--model", args.model,
           "--base", args.base, "--device", args.device, "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_tokens), "--workers", str(args.workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"\(([\d.]+) reports/s\)", done.stderr)
    if done.returncode != 0 or not m:
        raise SystemExit(f"error: infer.py failed:\n{done.stderr[-2000:]}")
    return float(m.group(1)), {int(json.loads(line)["id"]): json.loads(line)["prediction"] for line in out.read_text().splitlines()}


def one_prefill_seconds(args: argparse.Namespace, image: Path) -> float:
    """Image encoding + prefill of one prompt, median of 5, in this process."""
    from llavarad.infer.generate import BatchGenerator, Prompt
    from llavarad.infer.images import load_image, preprocess
    from llavarad.infer.pipeline import embed_images, prompt_ids
    from llavarad.model.prompt import build_question
    from llavarad.model.weights import load_llavarad

    device = torch.device(args.device)
    model, tokenizer = load_llavarad(args.model, args.base, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    pixels = preprocess(load_image(str(image)), model.tower.cfg.image_size)[None].to(device)
    ids = prompt_ids(tokenizer, build_question(REASONS[1]))
    gen = BatchGenerator(model.llm, 1, model.positions(ids) + 1, tokenizer.eos_id)
    times = []
    with torch.no_grad():
        for _ in range(6):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            gen.add([Prompt(0, embed_images(model, pixels, [ids])[0], 1)])  # 1 token: the row ends at once
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first call warms up


def fmt(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else f"{x * 1000:.1f} ms" if unit == "s" else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    files = image_files(args, tmp)
    work = work_list(files, args.requests)
    requests = bodies(work, args.max_tokens)
    proc, url = (None, args.url) if args.url else start_server(args)
    rows, texts = [], []  # texts: (request index, streamed text) of every load
    try:
        for c in [int(x) for x in args.concurrency.split(",")]:
            seconds, timings = closed_loop(url, requests, c)
            rows.append(row(f"closed loop, concurrency {c}", seconds, timings))
            texts += [(i, t.text) for i, t in timings]
            print(rows[-1], file=sys.stderr)
        seconds, timings = open_loop(url, requests, args.rate)
        rows.append(row(f"open loop, {args.rate:g} requests/s", seconds, timings))
        texts += [(i, t.text) for i, t in timings]
        print(rows[-1], file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    offline_rate, predictions = offline(args, work, tmp)
    mismatches = sum(predictions[i] != text for i, text in texts)
    prefill = one_prefill_seconds(args, files[0])
    conc1 = next((r for r in rows if r["load"] == "closed loop, concurrency 1"), None)
    checks = {"offline reports/s": offline_rate, "one prefill s": prefill, "server texts equal to infer.py": len(texts) - mismatches,
              "MISMATCH": mismatches, "best closed-loop requests/s / offline reports/s": max(r["requests_per_s"] for r in rows[:-1]) / offline_rate,
              "ttft p50 at concurrency 1 / one prefill": conc1["ttft_p50"] / prefill if conc1 else None}
    print(f"\nserve.py vs infer.py --query-file, batch size {args.batch_size}, {args.max_tokens} max tokens, {args.device}")
    print(f"{'load':34} {'req/s':>8} {'TTFT p50':>10} {'TTFT p99':>10} {'ITL p50':>9} {'ITL p99':>9}")
    for r in rows:
        print(f"{r['load']:34} {r['requests_per_s']:8.2f} {fmt(r['ttft_p50']):>10} {fmt(r['ttft_p99']):>10} {fmt(r['itl_p50']):>9} {fmt(r['itl_p99']):>9}")
    print(f"{'infer.py --query-file (offline)':34} {offline_rate:8.2f}")
    print(f"one prefill: {fmt(prefill)}; " + "; ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in checks.items() if k != "one prefill s"))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checks": checks}, indent=1))
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
