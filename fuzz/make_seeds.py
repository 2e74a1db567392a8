"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/seed-*: small but
complete files of every kind each reader takes (a whole RWKV-7 checkpoint of C = 8 as
safetensors, .pth, fla names and a saved int8 model; our state file and a state-tuning
file), so that fuzzing starts from inputs that reach the deep checks. Run once; the
fuzzer's own corpus grows from these (scripts/fuzz.sh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
from support.pth_writer import write_pth  # noqa: E402
from support.safetensors_writer import read_raw, write_safetensors  # noqa: E402

C, H, N, V, F, D, L = 8, 2, 4, 16, 16, 8, 2
rng = np.random.default_rng(0)


def official() -> dict[str, np.ndarray]:
    t = lambda *shape: rng.standard_normal(shape).astype(np.float16)  # noqa: E731
    out = {"emb.weight": t(V, C), "blocks.0.ln0.weight": t(C), "blocks.0.ln0.bias": t(C)}
    for i in range(L):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2", "att.ln_x"):
            out[b + ln + ".weight"], out[b + ln + ".bias"] = t(C), t(C)
        for v in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            out[b + "att." + v] = t(1, 1, C)
        out[b + "att.r_k"] = t(H, N)
        for p in "wavg":
            out[b + f"att.{p}1"], out[b + f"att.{p}2"] = t(C, D), t(D, C)
        for m in ("receptance", "key", "value", "output"):
            out[b + f"att.{m}.weight"] = t(C, C)
        out[b + "ffn.x_k"] = t(1, 1, C)
        out[b + "ffn.key.weight"], out[b + "ffn.value.weight"] = t(F, C), t(C, F)
    out["ln_out.weight"], out["ln_out.bias"], out["head.weight"] = t(C), t(C), t(V, C)
    return out


def fla_one_layer() -> bytes:
    """Layer 0 of tests/data/tiny-rwkv7-hf (fla's names) at this file's dimensions:
    C 128 -> 8, F and V 512 -> 16, head size 64 -> 4 (in r_k), low-rank widths -> 8."""
    hf = read_raw(ROOT.parent / "tests" / "data" / "tiny-rwkv7-hf" / "model.safetensors")
    own = np.random.default_rng(1)  # not `rng`: the other seeds stay as they were
    out = {}
    for name, a in hf.items():
        if ".layers.1." in name:
            continue
        small = {128: C, 512: F, 32: D, 16: D, 2: H, 64: N if name.endswith("r_k") else D}
        out[name] = own.standard_normal([small.get(d, d) for d in a.shape]).astype(np.float16)
    path = ROOT / "fla-seed.tmp"
    write_safetensors(path, out)
    data = path.read_bytes()
    path.unlink()
    return data


def main() -> None:
    ck = ROOT / "corpus" / "checkpoint"
    weights = official()
    write_safetensors(ck / "seed-official.safetensors", weights)
    write_pth(ck / "seed-official.pth", weights)
    write_pth(ck / "seed-transposed.pth", weights, transpose={"blocks.0.att.key.weight", "blocks.1.att.w1"})
    # A saved int8 model: one projection as codes + scales with its metadata.
    saved = dict(weights)
    w = saved.pop("blocks.0.att.key.weight")
    saved["blocks.0.att.key.weight.codes"] = np.clip(np.round(w.astype(np.float32) * 40), -127, 127).astype(np.int8)
    saved["blocks.0.att.key.weight.scales"] = np.ones((C, 1), np.float16)  # K = 8 < 64: refused, a path too
    write_safetensors(ck / "seed-saved.safetensors", saved, {"format": "rwkv-gpu model v1", "quant.blocks.0.att.key.weight": "int8"})
    # fla names for the first layer's attention, official for the rest: the renaming path.
    fla = {("model.embeddings.weight" if k == "emb.weight" else k.replace("blocks.0.att.receptance.weight", "model.layers.0.attn.r_proj.weight")): v
           for k, v in weights.items()}
    write_safetensors(ck / "seed-fla.safetensors", fla)
    # A one-layer model wholly in fla's layout, then CONFIG_MARKER (src/fuzzing.rs) and its
    # config.json: layer 0 has no v_lora, so its width is the config's.
    (ck / "seed-fla-config").write_bytes(fla_one_layer() + b"\0config.json\0" + json.dumps(
        {"model_type": "rwkv7", "hidden_size": C, "num_hidden_layers": 1, "head_dim": N, "vocab_size": V,
         "intermediate_size": F, "decay_low_rank_dim": D, "a_low_rank_dim": D, "v_low_rank_dim": D,
         "gate_low_rank_dim": D}).encode())

    st = ROOT / "corpus" / "state_file"
    # Our state file for a model of these dimensions (src/fuzzing.rs `small`).
    meta = {"format": "rwkv-gpu state v1", "n_layer": str(L), "n_embd": str(C), "n_head": str(H), "head_size": str(N), "fingerprint": "0000000000001234"}
    write_safetensors(st / "seed-state.safetensors", {"att_shift": rng.standard_normal((L, C)).astype(np.float32),
                                                     "wkv": rng.standard_normal((L, H, N, N)).astype(np.float32),
                                                     "ffn_shift": rng.standard_normal((L, C)).astype(np.float32)}, meta)
    write_pth(st / "seed-tuning.pth", {f"blocks.{i}.att.time_state": rng.standard_normal((H, N, N)).astype(np.float32) for i in range(L)})

    (ROOT / "corpus" / "tokenizer" / "seed-text").write_bytes("Hello, world! 你好 \U0001F600\n\tdef f(x): return x".encode())
    (ROOT / "corpus" / "tokenizer" / "seed-ids").write_bytes(np.array([0, 33, 65529, 65530, 70001, 10002], "<u4").tobytes())
    sampler = bytes([100]) + np.array([1.0, 0.5], "<f4").tobytes() + bytes([5]) + np.array([0.5, 0.5, 0.996], "<f4").tobytes()
    sampler += bytes([3, 7, 2, 9, 42]) + rng.standard_normal(201).astype("<f4").tobytes()
    (ROOT / "corpus" / "sampler" / "seed-options").write_bytes(sampler)


if __name__ == "__main__":
    main()
