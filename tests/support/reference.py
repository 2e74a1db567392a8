"""NumPy reference of RWKV-7 ("x070") inference. Test oracle only, never product code.

Follows docs/rwkv7.md (the math): one token at a time, float64 arithmetic on the
checkpoint's (bf16 -> f32, exact) weights, so that it is a tighter oracle than the
official package's fp32 run. Run `python tests/support/reference.py` to compare with the
golden data in tests/data/.
"""
import json
import os
import struct

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def safetensors_metadata(path):
    """The `__metadata__` dict of a .safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def load_safetensors(path):
    """Read a .safetensors file into {name: ndarray}: float32 for BF16, F16, F32; int8 /
    uint8 as stored for I8 / U8 (quantized codes in saved models)."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        raw = buf[base + lo:base + hi]
        dt = info["dtype"]
        if dt == "BF16":  # bf16 is the top half of an f32: widen exactly
            a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            a = np.frombuffer(raw, "<f2").astype(np.float32)
        elif dt == "F32":
            a = np.frombuffer(raw, "<f4").copy()
        elif dt in ("I8", "U8"):
            a = np.frombuffer(raw, np.int8 if dt == "I8" else np.uint8).copy()
        else:
            raise ValueError(f"{name}: unsupported dtype {dt}")
        out[name] = a.reshape(info["shape"])
    return out


def dims(weights):
    """(n_layer, C, H, N, V) read from the tensors."""
    n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    V, C = weights["emb.weight"].shape
    H, N = weights["blocks.0.att.r_k"].shape
    return n_layer, C, H, N, V


def new_state(weights, dtype=np.float64):
    """Zero state: att_shift [L,C], wkv [L,H,N,N] (layer, head, value i, key j), ffn_shift [L,C]."""
    L, C, H, N, _ = dims(weights)
    return {"att_shift": np.zeros((L, C), dtype),
            "wkv": np.zeros((L, H, N, N), dtype),
            "ffn_shift": np.zeros((L, C), dtype)}


# ---- small kernel references (any leading batch dims; last dim = channels) ----

def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, like torch
    return (x - mu) / np.sqrt(var + eps) * w + b


def group_norm(x, w, b, n_groups, eps=64e-5):
    g = x.reshape(*x.shape[:-1], n_groups, -1)
    mu = g.mean(-1, keepdims=True)
    var = ((g - mu) ** 2).mean(-1, keepdims=True)
    return ((g - mu) / np.sqrt(var + eps)).reshape(x.shape) * w + b


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def l2_normalize(x, eps=1e-12):
    """torch.nn.functional.normalize over the last dim."""
    return x / np.maximum(np.sqrt((x * x).sum(-1, keepdims=True)), eps)


def wkv7_step(S, r, w, k, v, kk, a):
    """One delta-rule step. S [...,N,N] (value i, key j); vectors [...,N] (per head).
    Returns (S_new, y): S_new = S diag(w) + (S @ -kk)(kk*a)^T + v k^T; y = S_new @ r.
    Every term reads the OLD S; y reads the NEW S."""
    sa = S @ (-kk)[..., :, None]                       # [...,N,1]
    S_new = S * w[..., None, :] + sa * (kk * a)[..., None, :] + v[..., :, None] * k[..., None, :]
    y = (S_new @ r[..., :, None])[..., 0]
    return S_new, y


# ---- the model ----

def time_mix(p, i, x, state, v_first, H, N):
    """x is the ln1 output [C]. Returns (out [C], v_first); updates state rows of layer i."""
    d = state["att_shift"][i] - x
    state["att_shift"][i] = x
    xr, xw, xk, xv, xa, xg = (x + d * p[f"x_{c}"].ravel() for c in "rwkvag")
    r = p["receptance.weight"] @ xr
    k = p["key.weight"] @ xk
    v = p["value.weight"] @ xv
    w_raw = p["w0"].ravel() + np.tanh(xw @ p["w1"]) @ p["w2"]
    a = sigmoid(p["a0"].ravel() + (xa @ p["a1"]) @ p["a2"])
    g = sigmoid(xg @ p["g1"]) @ p["g2"]
    kk = l2_normalize((k * p["k_k"].ravel()).reshape(H, N)).reshape(-1)
    k = k * (1 + (a - 1) * p["k_a"].ravel())
    if i == 0:
        v_first = v
    else:
        v = v + (v_first - v) * sigmoid(p["v0"].ravel() + (xv @ p["v1"]) @ p["v2"])
    w = np.exp(-0.606531 * sigmoid(w_raw))
    hs = lambda t: t.reshape(H, N)
    state["wkv"][i], y = wkv7_step(state["wkv"][i], hs(r), hs(w), hs(k), hs(v), hs(kk), hs(a))
    y = group_norm(y.reshape(-1), p["ln_x.weight"], p["ln_x.bias"], H, 64e-5)
    y = y + ((hs(r) * hs(k) * p["r_k"]).sum(-1, keepdims=True) * hs(v)).reshape(-1)
    return p["output.weight"] @ (y * g), v_first


def channel_mix(p, i, x, state, tok, x0):
    """x is the ln2 output [C]. RWKV-7a DeepEmbed (p has s1): the key activations are
    scaled by the token's row of the layer's table merged with the normalised embedding
    x0 (rwkv7.md, DeepEmbed section)."""
    d = state["ffn_shift"][i] - x
    state["ffn_shift"][i] = x
    kf = np.maximum(p["key.weight"] @ (x + d * p["x_k"].ravel()), 0.0) ** 2
    if "s1" in p:
        r = p["s1"].shape[1]
        se = p["s_emb.weight"][int(tok)] + p["s_emb_x.weight"] @ x0
        ss = (x @ p["s1"]) @ se.reshape(r, r)
        kf = kf * (ss @ p["s2"] + p["s0"].ravel())
    return p["value.weight"] @ kf


def forward(weights, tokens, state, hidden=False):
    """Feed tokens one at a time from `state` (advanced in place). Returns logits [T,V]
    float64, or with hidden=True the head's input (ln_out output) [T,C]."""
    L, C, H, N, V = dims(weights)
    W = {k: v.astype(np.float64) for k, v in weights.items()}
    blk = [{k[len(f"blocks.{i}."):]: v for k, v in W.items() if k.startswith(f"blocks.{i}.")}
           for i in range(L)]
    out = np.zeros((len(tokens), C if hidden else V))
    for t, tok in enumerate(tokens):
        x = x0 = layer_norm(W["emb.weight"][int(tok)], W["blocks.0.ln0.weight"], W["blocks.0.ln0.bias"])
        v_first = None
        for i, b in enumerate(blk):
            att = {k[4:]: v for k, v in b.items() if k.startswith("att.")}
            ffn = {k[4:]: v for k, v in b.items() if k.startswith("ffn.")}
            dx, v_first = time_mix(att, i, layer_norm(x, b["ln1.weight"], b["ln1.bias"]),
                                   state, v_first, H, N)
            x = x + dx
            x = x + channel_mix(ffn, i, layer_norm(x, b["ln2.weight"], b["ln2.bias"]), state, tok, x0)
        h = layer_norm(x, W["ln_out.weight"], W["ln_out.bias"])
        out[t] = h if hidden else W["head.weight"] @ h
    return out


def load_case(name):
    """(weights, cases) for tests/data/<name>."""
    d = os.path.join(DATA, name)
    return load_safetensors(os.path.join(d, "model.safetensors")), np.load(os.path.join(d, "cases.npz"))


def maxdev(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


if __name__ == "__main__":
    w, c = load_case("tiny-rwkv7")
    st = new_state(w)
    devs = {"prompt_logits": maxdev(forward(w, c["prompt"], st), c["prompt_logits"])}
    for key in ("att_shift", "wkv", "ffn_shift"):
        devs["prefill_" + key] = maxdev(st[key], c["prefill_" + key])
    devs["step_logits"] = maxdev(forward(w, c["step_tokens"], st), c["step_logits"])
    for key in ("att_shift", "wkv", "ffn_shift"):
        devs["final_" + key] = maxdev(st[key], c["final_" + key])
    w, c = load_case("deepembed-rwkv7a")
    devs["deepembed prompt_logits"] = maxdev(forward(w, c["prompt"], new_state(w)), c["prompt_logits"])
    w, c = load_case("trained-bytes")
    devs["trained-bytes logits"] = maxdev(forward(w, c["tokens"], new_state(w)), c["logits"])
    for k, v in devs.items():
        print(f"{k:24s} max abs dev {v:.3e}")
    worst = max(devs.values())
    print("OK" if worst < 1e-4 else "FAIL", f"(worst {worst:.3e}, tolerance 1e-4)")
    raise SystemExit(0 if worst < 1e-4 else 1)
