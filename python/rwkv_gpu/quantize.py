"""`python -m rwkv_gpu.quantize IN OUT --dtype nf4`: quantizes a checkpoint on the GPU
once and saves it (`Model.save`), so later loads skip the work. OUT is a .safetensors
file that `rwkv_gpu.Model(OUT)` loads in the saved formats."""

from __future__ import annotations

import argparse
import sys
import time

from . import RwkvError, _core
from ._cli import add_quant_args, quant_layer_dtypes, reports_errors
from .model import Model


@reports_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkv_gpu.quantize", description=__doc__)
    ap.add_argument("input", help="checkpoint (.pth or .safetensors)")
    ap.add_argument("output", help="the .safetensors file to write")
    ap.add_argument("--adapter", help="adapter index or name substring (see rwkv_gpu.adapters())")
    add_quant_args(ap)
    args = ap.parse_args(argv)
    try:
        n_layer = _core.checkpoint_config(args.input)["n_layer"]
        start = time.perf_counter()
        model = Model(args.input, adapter=args.adapter, layer_dtypes=quant_layer_dtypes(args, n_layer), quant_head=args.quant_head)
        loaded = time.perf_counter() - start
        model.save(args.output)
    except RwkvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mem = model.memory()
    weights = sum(mem[k] for k in ("weights_fp16", "weights_int8", "weights_nf4", "weights_f32", "head"))
    print(f"{args.output}: {model.dtype} layers, head {model.weight_formats()['head']}, "
          f"{weights / 1e9:.3f} GB of device weights (loaded and quantized in {loaded:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
