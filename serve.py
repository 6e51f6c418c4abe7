"""Serve LLaVA-Rad over HTTP: an OpenAI-compatible chat-completions API and a reading-room page.

    pip install -e ".[serve]"
    python serve.py --model microsoft/llava-rad --base lmsys/vicuna-7b-v1.5
    # prints: serving llava-rad on http://127.0.0.1:8000 ; open it in a browser

One process owns the model: every request goes through one continuous-batching decode loop with
--batch-size cache rows. Greedy by default (the same text as `infer.py IMAGE --reason TEXT`);
temperature / top_p / seed per request. Logs go to stderr and never hold an image or a reason.
SIGINT / SIGTERM: new requests and those still waiting for a row get 503 with Retry-After at once,
the reports being written get --shutdown-grace seconds to finish, then each one still open ends with
an error (in a stream: an SSE error event, then [DONE]); exit 0.

Bound to a loopback address (the default), the server refuses a Host header that is not a loopback
name or address (a web page cannot reach it through DNS rebinding) unless --allowed-host lists it;
it sends no CORS headers unless --cors-origin names the origins whose pages may call it.
"""

import argparse
import os
import signal
import socket
import sys
import threading

import torch

from llavarad.explain.relevance import gradient_problem
from llavarad.infer.pipeline import load
from llavarad.model.config import DTYPES
from llavarad.model.quant import MODES
from llavarad.serve.app import ServeConfig, Server
from llavarad.serve.middleware import is_loopback
from llavarad.serve.prometheus import Metrics
from llavarad.serve.scheduler import Scheduler


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="microsoft/llava-rad", help="release or export folder, or Hugging Face repo id")
    p.add_argument("--base", default="lmsys/vicuna-7b-v1.5", help="base Llama folder or Hugging Face repo id")
    p.add_argument("--tower", help="folder with the tower files, for a release folder without them, as infer.py --tower")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: an export's own; else bfloat16 on GPU or with --quantize, float32 on CPU")
    p.add_argument("--quantize", choices=MODES, help="decoder linear layers in 8 or 4 bits, as infer.py --quantize")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    p.add_argument("--served-name", default="llava-rad", help="the model name clients send (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("LLAVARAD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLAVARAD_API_KEY; none: no key)")
    p.add_argument("--batch-size", type=int, default=8, help="cache rows: reports generated at once (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429 (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the cap and default of max_tokens (default: %(default)s)")
    p.add_argument("--max-text-tokens", type=int, default=256,
                   help="prompt tokens besides the image (system prompt + reason for exam) a row has room for (default: %(default)s)")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest image accepted, in MiB (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000, help="largest image accepted, in pixels (default: %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds the reports being written get to finish on SIGINT/SIGTERM (default: %(default)s)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name to accept besides loopback ones (repeatable); any given turns the Host check on "
                        "even when not bound to loopback")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="an origin (https://app.example) whose pages may call the API: CORS headers for it (repeatable)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="replay the decode step as a CUDA graph (default: on with CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_queue", "max_new_tokens", "max_text_tokens", "max_image_pixels"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_image_mb <= 0 or args.shutdown_grace < 0:
        p.error("--max-image-mb must be positive and --shutdown-grace not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print('error: serving needs FastAPI and uvicorn: pip install -e ".[serve]"', file=sys.stderr)
        return 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else None  # pipeline.load: an export's own, else the device's default
    try:
        sock = socket.create_server((args.host, args.port))  # bind first: a busy port fails before the model loads
    except OSError as e:
        print(f"error: {args.host}:{args.port}: cannot listen ({e.strerror})", file=sys.stderr)
        return 1
    try:
        model, tokenizer = load(args.model, args.base, device, dtype, args.tower, args.quantize)
        n_patches = model.tower.num_patches
        config = ServeConfig(
            served_name=args.served_name, api_key=args.api_key or None, max_new_tokens=args.max_new_tokens,
            max_image_bytes=int(args.max_image_mb * 2**20), max_pixels=args.max_image_pixels,
            max_len=n_patches + args.max_text_tokens + args.max_new_tokens, explain_problem=gradient_problem(model),
            allowed_hosts=tuple(args.allowed_host) if args.allowed_host or is_loopback(args.host) else None,
            cors_origins=tuple(args.cors_origin),
        )
        metrics = Metrics()
        scheduler = Scheduler(model, tokenizer.eos_id, args.batch_size, config.max_len, args.max_queue, metrics,
                              cuda_graph=device.type == "cuda" if args.cuda_graph is None else args.cuda_graph, compile=args.compile)
    except (OSError, ValueError) as e:  # a missing or broken checkpoint, --cuda-graph without CUDA
        print(f"error: {e}", file=sys.stderr)
        return 1
    server = Server(scheduler, tokenizer, model.tower.cfg.image_size, n_patches, config, metrics)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.served_name} on http://{host if ':' not in host else f'[{host}]'}:{port}"
          f"{' (API key required)' if config.api_key else ''}", file=sys.stderr, flush=True)
    # uvicorn runs in a thread, so the signals come here: the decode loop drains first (every request
    # gets its answer or its error), then uvicorn stops with nothing left to cut.
    http = uvicorn.Server(uvicorn.Config(server.app, log_level="info", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="http")
    signalled = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: signalled.set())
    thread.start()
    while thread.is_alive() and not signalled.wait(0.2):
        pass
    if signalled.is_set():
        print(f"stopping: new and waiting requests get 503; the reports being written get {args.shutdown_grace:g}s",
              file=sys.stderr, flush=True)
    scheduler.stop(args.shutdown_grace)
    http.should_exit = True
    thread.join()
    print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
