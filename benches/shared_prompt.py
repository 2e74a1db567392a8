"""Whole-process timing of requests arriving together that share a prompt start, for A/B
runs of two builds: loads MODEL, submits REQUESTS to an Engine at once, each a shared
start of TOKENS seeded random token ids followed by its own tail (`--tail` ids; 0: one
prompt for all, as n choices are), waits for all, and prints the wall time of the
submissions to the last result, with how many requests shared a reading. Run it under a
process timer, alternating builds (`PYTHONPATH=<other build>`), and quote the ratio of
wall times pair by pair.

    python benches/shared_prompt.py tests/data/trained-bytes/model.safetensors --requests 8 --tokens 2000
    python benches/shared_prompt.py tests/data/trained-bytes/model.safetensors --requests 8 --tokens 1500 --tail 16
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import rwkv_gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2000, help="length of the shared start")
    ap.add_argument("--tail", type=int, default=0, help="each request's own tokens after it (0: one prompt)")
    ap.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # the software-adapter warning on lavapipe
    try:
        model = rwkv_gpu.Model(args.model)
    except rwkv_gpu.RwkvError as e:
        raise SystemExit(f"error: {e}") from None
    rng = np.random.default_rng(0)
    vocab = model.config["vocab_size"]
    shared = [int(t) for t in rng.integers(1, vocab, args.tokens)]
    prompts = [shared + [int(t) for t in rng.integers(1, vocab, args.tail)] for _ in range(args.requests)]
    with rwkv_gpu.Engine(model, max_batch=args.requests) as engine:
        started = time.perf_counter()
        requests = [engine.submit(p, max_tokens=args.max_tokens, temperature=1.0, seed=i, stop_tokens=(),
                                  cache_points=[args.tokens] if args.tail else ())
                    for i, p in enumerate(prompts)]
        for r in requests:
            r.result(timeout=3600)
        wall = time.perf_counter() - started
        shared_reads = engine.stats().get("prompt_reads_shared", 0)
    print(f"{args.requests} requests x ({args.tokens} shared + {args.tail} own tokens): {wall:.2f} s, "
          f"{shared_reads} started from another's reading")


if __name__ == "__main__":
    main()
