"""The bench's cold-start measurement (`python -m rwkv_gpu.bench --cold-start`): fresh
processes timing `import rwkv_gpu` -> Model loaded -> the first token of a one-token
prompt, first with an empty pipeline cache directory (every kernel compiled by the
driver) and then with the cache that run left (RWKV_GPU_CACHE_DIR). Mesa's own shader
cache is turned off in both (MESA_SHADER_CACHE_DISABLE), so that on Mesa drivers the
difference is this library's cache; other drivers may keep caches of their own."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, warnings
t0 = time.perf_counter()
import rwkv_gpu
t1 = time.perf_counter()
warnings.simplefilter("ignore")
spec = json.loads(sys.argv[1])
if spec["model"]:
    model = rwkv_gpu.Model(spec["model"], adapter=spec["adapter"], dtype=spec["dtype"])
else:
    model = rwkv_gpu.Model.random(spec["n_layer"], spec["n_embd"], adapter=spec["adapter"])
t2 = time.perf_counter()
model.forward_argmax([1], model.new_state())
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first": t3 - t2, "total": t3 - t0}))
"""


def run(spec: dict, cache_dir: str) -> dict:
    env = {**os.environ, "RWKV_GPU_CACHE_DIR": cache_dir, "MESA_SHADER_CACHE_DISABLE": "true"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"cold-start child failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(spec: dict, repetitions: int) -> list[tuple[str, dict[str, float]]]:
    """[("cold", means), ("warm", means)] over `repetitions` fresh processes each."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="rwkv-gpu-cold-") as root:
        colds = []
        for i in range(repetitions):
            colds.append(run(spec, os.path.join(root, f"cold{i}")))  # a new, empty cache each time
        warm_dir = os.path.join(root, f"cold{repetitions - 1}")  # left filled by the last cold run
        warms = [run(spec, warm_dir) for _ in range(repetitions)]
        for label, runs in (("cold (empty pipeline cache)", colds), ("warm (pipeline cache from a previous run)", warms)):
            rows.append((label, {k: statistics.mean(r[k] for r in runs) for k in runs[0]}))
    return rows


def table(rows: list[tuple[str, dict[str, float]]], name: str) -> str:
    lines = [f"cold start, {name}: import rwkv_gpu -> model loaded -> first token (fresh processes, seconds)", "",
             "| start | import | load | first token | total |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, m in rows:
        lines.append(f"| {label} | {m['import']:.2f} | {m['load']:.2f} | {m['first']:.2f} | {m['total']:.2f} |")
    return "\n".join(lines)
