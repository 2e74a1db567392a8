"""Quantization quality over the whole held-out text of tests/data/trained-bytes, on the
GPU: mean KL(fp16 || quantized) per token, top-1 agreement, and the fp16 perplexity
against the official one in meta.json. Not collected by pytest (about 6 minutes per
dtype on lavapipe; seconds on a GPU). Run: python tools/quant_quality.py [bytes]"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import rwkv_gpu

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "trained-bytes"


def main():
    text = (DATA / "heldout.txt").read_bytes()
    if len(sys.argv) > 1:
        text = text[: int(sys.argv[1])]
    tokens = list(text)
    logits = {}
    warnings.simplefilter("ignore", RuntimeWarning)
    for fmt in ("fp16", "int8", "nf4"):
        m = rwkv_gpu.Model(DATA / "model.safetensors", dtype=fmt)
        logits[fmt] = m.forward(tokens, m.new_state(), all_logits=True).astype(np.float64)
        m.close()
    logp = {k: v - np.logaddexp.reduce(v, axis=1, keepdims=True) for k, v in logits.items()}
    n = len(tokens)
    ppl = float(np.exp(-logp["fp16"][np.arange(n - 1), tokens[1:]].mean()))
    official = json.loads((DATA / "meta.json").read_text())["official_fp32_ppl"]
    print(f"{n} bytes; fp16 perplexity {ppl:.6f}, official {official:.6f}, ratio {ppl / official:.6f}")
    for fmt in ("int8", "nf4"):
        kl = (np.exp(logp["fp16"]) * (logp["fp16"] - logp[fmt])).sum(1).mean()
        top1 = (logits["fp16"].argmax(1) == logits[fmt].argmax(1)).mean()
        print(f"{fmt}: mean KL {kl:.3e}, top-1 agreement {top1:.4f}")


if __name__ == "__main__":
    main()
