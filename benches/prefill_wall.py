"""Whole-process prefill timing for A/B runs of two builds: loads MODEL, feeds one
warm-up prompt, then REPEAT prompts of TOKENS seeded random token ids, each from a
fresh state, and prints prefill tokens/s. Run it under a process timer, alternating
builds (`PYTHONPATH=<other build>`), and quote the ratio of wall times pair by pair.

    python benches/prefill_wall.py tests/data/trained-bytes/model.pth --tokens 4096 --repeat 3
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
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # the software-adapter warning on lavapipe
    try:
        model = rwkv_gpu.Model(args.model)
    except rwkv_gpu.RwkvError as e:
        raise SystemExit(f"error: {e}") from None
    ids = [int(t) for t in np.random.default_rng(0).integers(0, model.config["vocab_size"], args.tokens)]
    model.prefill(ids[:300], model.new_state())  # compiles the chunk shapes
    started = time.perf_counter()
    for _ in range(args.repeat):
        model.forward(ids, model.new_state())
    print(f"prefill {args.repeat * args.tokens / (time.perf_counter() - started):.1f} t/s")


if __name__ == "__main__":
    main()
