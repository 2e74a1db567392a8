"""A prefill matrix-matrix kernel of this build against another build's, interleaved:
both WGSL sources (rwkv_gpu.kernel_source of each build) run through wgpu-py on the
same buffers, A B A B, and the per-dispatch times are printed with the
ratio pair by pair. For kernel changes whose speed-up must be shown back to back.

    python benches/kernel_ab.py --other /path/to/unpacked/old/wheel --tokens 64 --rows 1024 --k 1024 [--entry matmul_direct]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import test_kernel_speed as speed  # noqa: E402
import wgpu  # noqa: E402

DEFINES = speed.DEFINES


def other_sources(path: str, name: str, defines: dict[str, list[str]]) -> dict[str, str]:
    """The other build's kernel sources, from a process that imports it. Builds before
    SINGLE_FORMAT refuse it as an unknown define: they are asked again with their
    F16_ONLY in its place for f16, without it otherwise."""
    env = {**os.environ, "PYTHONPATH": path}

    def ask(defs: dict[str, list[str]], **kw) -> dict[str, str]:
        code = f"import json, rwkv_gpu; print(json.dumps({{f: rwkv_gpu.kernel_source({name!r}, d) for f, d in {defs!r}.items()}}))"
        return json.loads(subprocess.check_output([sys.executable, "-c", code], env=env, **kw))

    try:
        return ask(defines, stderr=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        older = {f: [d for d in ds if not d.startswith("SINGLE_FORMAT")] or ["F16_ONLY"] for f, ds in defines.items()}
        return ask(older)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", required=True, help="a folder holding the other build's rwkv_gpu package")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--dtypes", default="fp16,int8,nf4")
    ap.add_argument("--entry", default="matmul_tiled", choices=["matmul_tiled", "matmul_direct"],
                    help="the GPU kernel (staged tiles) or the CPU drivers' (direct loads)")
    args = ap.parse_args()
    adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    device = adapter.request_device_sync(required_features=[f for f in ["subgroup"] if f in adapter.features])
    dtypes = args.dtypes.split(",")
    theirs = other_sources(args.other, "matmul_mat", {f: DEFINES[f] for f in dtypes})
    ours = speed.rwkv_gpu.kernel_source
    for fmt in dtypes:
        a, _, _ = speed.matmul_kernel(device, args.entry, fmt, args.rows, args.k, args.tokens)
        speed.rwkv_gpu.kernel_source = lambda _name, _defines, fmt=fmt: theirs[fmt]
        try:
            b, _, _ = speed.matmul_kernel(device, args.entry, fmt, args.rows, args.k, args.tokens)
        finally:
            speed.rwkv_gpu.kernel_source = ours
        a(), b()  # compiled and warm
        times: dict[str, list[float]] = {"this": [], "other": []}
        for _ in range(args.pairs):
            for label, kernel in (("this", a), ("other", b)):
                started = time.perf_counter()
                kernel()
                times[label].append((time.perf_counter() - started) * 1e3 / speed.DISPATCHES)
        ratios = np.array(times["this"]) / np.array(times["other"])
        print(f"{args.entry} {fmt} {args.rows}x{args.k} over {args.tokens} tokens: "
              f"this {np.median(times['this']):.2f} ms, other {np.median(times['other']):.2f} ms per dispatch; "
              f"this/other median {np.median(ratios):.3f} ({ratios.min():.2f}-{ratios.max():.2f})")


if __name__ == "__main__":
    main()
