"""`python -m rwkv_gpu.serve --model PATH`: an OpenAI-compatible server on this machine.

Listens on 127.0.0.1:8000 by default (loopback: other machines cannot reach it unless
--host says so). With --api-key (or RWKV_GPU_API_KEY) every /v1 call needs
`Authorization: Bearer KEY`. Endpoints: /v1/models, /v1/completions,
/v1/chat/completions, /v1/embeddings, /v1/responses (previous_response_id continues from
the stored state), /health, /metrics (Prometheus).
"""

from __future__ import annotations

import argparse
import os
import sys

from ._cli import add_model_args, load_model, reports_errors


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rwkv_gpu.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("RWKV_GPU_API_KEY"),
                    help="require Authorization: Bearer KEY (default: env RWKV_GPU_API_KEY; none: open)")
    ap.add_argument("--model-name", help="the model id clients ask for (default: the file's name)")
    ap.add_argument("--dtype", choices=("fp16", "int8", "nf4"), help="weight format (default: as the file holds them)")
    ap.add_argument("--max-batch", type=int, default=16, help="requests generated at once (default 16)")
    ap.add_argument("--max-prefill-tokens", type=int, default=512,
                    help="prompt tokens fed per step while others decode (default 512)")
    ap.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 429 (default 1024)")
    ap.add_argument("--max-prompt-tokens", type=int, default=65536, help="longer prompts get 413 (default 65536)")
    ap.add_argument("--max-output-tokens", type=int, default=8192,
                    help="the most tokens one request may ask for (default 8192)")
    ap.add_argument("--cache-mib", type=int, default=256, help="device MiB for the prefix cache (default 256)")
    ap.add_argument("--response-store-mib", type=int, default=1024,
                    help="device MiB for stored response states (default 1024)")
    ap.add_argument("--route", metavar="I/N",
                    help="this is server I of N behind nginx's `hash` (see deploy/nginx.conf): response ids are "
                         "minted so that previous_response_id comes back here")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def model_name_for(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in (".pth", ".safetensors"):
        base = base.removesuffix(ext)
    return base or "rwkv"


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("error: the server needs its extras: pip install 'rwkv-gpu[server]'", file=sys.stderr)
        return 1
    from .engine import Engine
    from .server import create_app

    route = None
    if args.route:
        try:
            index, servers = (int(x) for x in args.route.split("/"))
        except ValueError:
            print(f"error: --route must be I/N (e.g. 0/2), got {args.route!r}", file=sys.stderr)
            return 1
        route = (index, servers)
    model = load_model(args)  # --state: the initial state of every conversation
    engine = Engine(model, max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens,
                    cache_bytes=args.cache_mib << 20, max_queue=args.max_queue)
    app = create_app(engine, args.model_name or model_name_for(args.model), api_key=args.api_key,
                     max_prompt_tokens=args.max_prompt_tokens,
                     max_output_tokens=args.max_output_tokens, response_store_bytes=args.response_store_mib << 20,
                     route=route)
    print(f"serving {model!r} as {args.model_name or model_name_for(args.model)!r} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
