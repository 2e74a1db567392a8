"""Memory over a long generation: `python benches/long_run.py [--tokens 100000] [--model PATH]`.
Generates TOKENS tokens in one run (the trained byte model by default), printing the
process's resident memory and the model's device memory every 10% and the growth after
the first 10% (the warm-up: kernels compiled, programs recorded). Issue 13 asks for
< 1% growth over 100,000 tokens."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import rwkv_gpu


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "tests/data/trained-bytes/model.safetensors"))
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = rwkv_gpu.Model(args.model)
    state = model.new_state()
    step = max(1, args.tokens // 10)
    start = time.perf_counter()
    base = None
    for i, _ in enumerate(model.generate("import os\n", state=state, max_tokens=args.tokens, temperature=1.0, seed=0, stop_tokens=()), 1):
        if i % step == 0:
            now, device = rss(), sum(model.memory().values())
            base = base or (now, device)
            print(f"{i:>8} tokens  {time.perf_counter() - start:7.1f} s  rss {now / 2**20:8.1f} MiB  device {device / 2**20:7.1f} MiB", flush=True)
    growth = (rss() - base[0]) / base[0] * 100
    print(f"growth after warm-up: rss {growth:+.2f}%, device {(sum(model.memory().values()) - base[1]) / 2**20:+.1f} MiB")
    return 0 if growth < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
