"""Device memory of a model as `model.memory()` reports it and as seen from outside the
process, for one state and the scratch of a 512-token prefill.

    python benches/memory.py --shape 2.9b --dtype nf4 [--prefill 512]

Outside view: on NVIDIA, the process's memory in `nvidia-smi --query-compute-apps`
(NVML); on a software adapter (lavapipe, where device memory is host memory), the growth
of the process's resident set from before the model was built, less the host copy of
the embedding table (it is host memory on every device). GB = 1e9 bytes.

Scratch is sized by the prefill chunk (at most 256 tokens), not by the prompt, and a
prefill that wants the last token's logits grows the logits buffer to one token only:
`--prefill 1` allocates the same as 512 (tests/test_work_counts.py checks this), which matters
on lavapipe, where a 512-token prefill of a 2.9B model takes many minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import rwkv_gpu
from rwkv_gpu.bench import SHAPES, process_memory


def nvml_process_bytes() -> int | None:
    """This process's device memory as NVML reports it, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, mib = (x.strip() for x in line.split(","))
        if int(pid) == os.getpid():
            return int(mib) * 2**20
    return 0


def trim_heap() -> bool:
    """Returns freed heap memory to the OS (glibc keeps freed load-time buffers mapped,
    which would count as resident memory of a model that no longer holds them)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="2.9b")
    ap.add_argument("--dtype", choices=("fp16", "int8", "nf4"), default="fp16")
    ap.add_argument("--quant-head", action="store_true")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--adapter")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    n_layer, n_embd = SHAPES[args.shape]
    rwkv_gpu.Model.random(1, 64, vocab_size=64, adapter=args.adapter).close()  # the driver, loaded
    trim_heap()
    before = process_memory()["rss"]
    start = time.perf_counter()
    model = rwkv_gpu.Model.random(n_layer, n_embd, 65536, dtype=args.dtype, quant_head=args.quant_head, adapter=args.adapter)
    built = time.perf_counter() - start
    state = model.new_state()
    start = time.perf_counter()
    model.forward(np.arange(args.prefill) % 65536, state)
    ran = time.perf_counter() - start
    mem = model.memory()
    cfg = model.config
    host_emb = 65536 * n_embd * 2  # the random model's table is fp16
    after = process_memory()
    print(f"{args.shape} ({n_layer} x {n_embd}) {args.dtype}{' + int8 head' if args.quant_head else ''} on {cfg['adapter']} ({cfg['backend']}); "
          f"built in {built:.1f} s, {args.prefill}-token prefill in {ran:.1f} s")
    for key, value in mem.items():
        print(f"  {key:13s} {value / 1e9:8.4f} GB")
    print(f"  {'total':13s} {sum(mem.values()) / 1e9:8.4f} GB  (model.memory())")
    report = model._m.allocator_report()
    if report:
        print(f"  device allocator: {report[0] / 1e9:.4f} GB in live allocations, {report[1] / 1e9:.4f} GB of memory blocks held")
    nvml = nvml_process_bytes()
    if nvml:
        print(f"  NVML process memory {nvml / 1e9:.4f} GB")
    if cfg["device_type"] == "cpu":
        growth = after["rss"] - before
        print(f"  resident growth {growth / 1e9:.4f} GB; less the host embedding table ({host_emb / 1e9:.4f} GB): "
              f"{(growth - host_emb) / 1e9:.4f} GB; peak resident {after['peak_rss'] / 1e9:.4f} GB")
        if trim_heap():
            growth = process_memory()["rss"] - before
            print(f"  after malloc_trim (freed load-time buffers the C heap kept): resident growth {growth / 1e9:.4f} GB, "
                  f"less the embedding table {(growth - host_emb) / 1e9:.4f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
