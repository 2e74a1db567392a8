"""Whole-process timing of batched generation for an A/B of where the tokens are drawn
(`RWKV_GPU_SAMPLE_ON=host` against `device`): a random model of `--layers` x `--width`
(or a bench `--shape`) with a `--vocab` vocabulary (the draw's cost grows with it, the
step's with the other two), `--batch` sequences of seeded random prompts generating `--tokens` tokens each
with the given top-p and temperature, no stop. Prints the milliseconds per step and
where the draws ran. Run it under a process timer, the two settings alternating, and
quote the ratio of wall times pair by pair:

    RWKV_GPU_SAMPLE_ON=host python benches/draw_place.py --batch 16
    RWKV_GPU_SAMPLE_ON=device python benches/draw_place.py --batch 16
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import rwkv_gpu
from rwkv_gpu.bench import SHAPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--shape", choices=SHAPES, help="a bench shape: its layers and width (e.g. 2.9b)")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--top-p", type=float, default=0.85)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # the software-adapter warning on lavapipe
    layers, width = SHAPES[args.shape] if args.shape else (args.layers, args.width)
    model = rwkv_gpu.Model.random(layers, width, vocab_size=args.vocab)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(1, args.vocab, 8)] for _ in range(args.batch)]
    options = dict(temperature=args.temperature, top_p=args.top_p, seed=1, stop_tokens=(), banned_tokens=())
    model.complete_batch(prompts, max_tokens=2, **options)  # warm-up: kernels compiled, plans recorded
    started = time.perf_counter()
    model.complete_batch(prompts, max_tokens=args.tokens, **options)
    seconds = time.perf_counter() - started
    print(f"{1e3 * seconds / args.tokens:.2f} ms a step, {args.batch} sequences, "
          f"draws on the {model.config['sample_on']} ({model.config['adapter']})")


if __name__ == "__main__":
    main()
