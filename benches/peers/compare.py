"""rwkv-gpu and web-rwkv side by side: same adapter, same model file, same definitions,
back to back, and the ratio.

    cd benches/peers && cargo update -p serde --precise 1.0.228 && cargo build --release
    python benches/peers/compare.py --shape 0.1b -p 64 -n 16 -r 3

The model is a random one of the chosen shape (rwkv_gpu.Model.random, saved), written
in web-rwkv's layout (every tensor fp16, low-rank matrices transposed); rwkv-gpu reads
that layout too, so both load the very same file. Definitions (rwkv-gpu's bench):
ppP = P random tokens, logits of the last only; tgN = N steps, each reading the full
logits back and taking the argmax on the host; one warm-up, then -r runs, mean ± std.
web-rwkv runs pp at each --chunks token chunk size and reports its best, and tg at that
size. Output: a markdown table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import rwkv_gpu
from rwkv_gpu.bench import SHAPES, Bench, log, time_runs

HERE = Path(__file__).parent
RUNNER = HERE / "target" / "release" / "rwkv-gpu-peers"
LOW_RANK = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        chunk = raw[8 + n + lo:8 + n + hi]
        if info["dtype"] == "BF16":
            a = (np.frombuffer(chunk, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(chunk, DTYPES[info["dtype"]])
        out[name] = a.reshape(info["shape"])
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        data = np.ascontiguousarray(a, np.float16).tobytes()
        header[name] = {"dtype": "F16", "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            f.write(b)


def web_rwkv_model(shape: str, folder: Path) -> Path:
    """A random model of `shape` in web-rwkv's layout (fp16; low-rank matrices [out, in])."""
    n_layer, n_embd = SHAPES[shape]
    official = folder / "official.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rwkv_gpu.Model.random(n_layer, n_embd, 65536).save(official)
    tensors = read_safetensors(official)
    for name in list(tensors):
        if name.rsplit(".", 1)[-1] in LOW_RANK:
            tensors[name] = tensors[name].T
    path = folder / f"random-{shape}-web-rwkv.safetensors"
    write_safetensors(path, tensors)
    official.unlink()
    return path


def summary(rates: list[float]) -> tuple[float, float]:
    return statistics.mean(rates), statistics.stdev(rates) if len(rates) > 1 else 0.0


def run_web_rwkv(model: Path, args: argparse.Namespace, dtype: str, n_layer: int, chunk: int) -> dict[str, list[float]]:
    cmd = [str(RUNNER), "--model", str(model), "--token-chunk-size", str(chunk),
           "-p", str(args.prefill_length), "-n", str(args.generation_length), "-r", str(args.repetitions)]
    if dtype == "int8":
        cmd += ["--quant", str(n_layer)]
    elif dtype == "nf4":
        cmd += ["--quant-nf4", str(n_layer)]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"web-rwkv failed ({' '.join(cmd)}):\n{done.stderr}")
    return {r["test"]: r["tokens_per_s"] for r in map(json.loads, done.stdout.splitlines())}


def run_rwkv_gpu(model: Path, args: argparse.Namespace, dtype: str) -> dict[str, list[float]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = rwkv_gpu.Model(model, dtype=dtype, adapter=args.adapter)
    bench = Bench(m, args.prefill_length, args.generation_length)
    p, n = args.prefill_length, args.generation_length
    out = {
        f"pp{p}": [p / t for t in time_runs(bench.pp, args.repetitions)],
        f"tg{n}": [n / t for t in time_runs(bench.tg(m.new_state, on_device=False), args.repetitions)],
    }
    m.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="0.1b")
    ap.add_argument("-p", "--prefill-length", type=int, default=512)
    ap.add_argument("-n", "--generation-length", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--dtypes", default="fp16,int8,nf4")
    ap.add_argument("--chunks", default="32,64,128,256", help="web-rwkv token chunk sizes to try for pp")
    ap.add_argument("--adapter", help="adapter name substring, for both runtimes")
    args = ap.parse_args()
    if not RUNNER.exists():
        raise SystemExit(f"{RUNNER} is missing: build it first (see {HERE / 'README.md'})")
    n_layer = SHAPES[args.shape][0]
    p, n = args.prefill_length, args.generation_length
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        log(f"writing a random {args.shape} model in web-rwkv's layout ...")
        model = web_rwkv_model(args.shape, Path(folder))
        for dtype in args.dtypes.split(","):
            log(f"{dtype}: rwkv-gpu ...")
            ours = run_rwkv_gpu(model, args, dtype)
            best: tuple[float, int, dict[str, list[float]]] | None = None
            for chunk in (int(c) for c in args.chunks.split(",")):
                log(f"{dtype}: web-rwkv, token chunk size {chunk} ...")
                theirs = run_web_rwkv(model, args, dtype, n_layer, chunk)
                pp = summary(theirs[f"pp{p}"])[0]
                if best is None or pp > best[0]:
                    best = (pp, chunk, theirs)
            assert best is not None
            for test in (f"pp{p}", f"tg{n}"):
                (w, ws), (o, os_) = summary(best[2][test]), summary(ours[test])
                rows.append((dtype, test, best[1], w, ws, o, os_))
    adapter = args.adapter or "default adapter"
    print(f"random {args.shape} ({n_layer} layers), vocab 65536, on {adapter}; web-rwkv 0.10.20 at its best token chunk size")
    print()
    print("| dtype | test | web-rwkv chunk | web-rwkv t/s | rwkv-gpu t/s | rwkv-gpu / web-rwkv |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for dtype, test, chunk, w, ws, o, os_ in rows:
        print(f"| {dtype} | {test} | {chunk} | {w:.2f} ± {ws:.2f} | {o:.2f} ± {os_:.2f} | {o / w:.2f}x |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    sys.exit(main())
