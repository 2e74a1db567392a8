"""Quality of the weight-quantization formats of tests/support/quant_reference.py on the trained model.

Runnable script (not a pytest test):  python tools/quant_study.py [n_tokens]

For each variant, the six big matrices of every layer (att.receptance/key/value/output,
ffn.key/value) are replaced by their quantize -> dequantize round trip (quantized from the
checkpoint's f32 weights); every other weight, the head included, is rounded to fp16, which
is what the GPU runs. The baseline is the same model with the six matrices rounded to fp16
too. All variants run together, one token at a time over tests/data/trained-bytes/heldout.txt
with the state carried through, in float64 (a batched copy of tests/support/reference.py's forward,
checked against it on the first tokens). Reported per variant: mean over tokens of
KL(p_fp16 || p_quant) in nats, its max, top-1 agreement with the baseline, and
next-byte perplexity.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from support import quant_reference as qr  # noqa: E402
from support import reference as ref  # noqa: E402

QUANTIZED = ("att.receptance.weight", "att.key.weight", "att.value.weight",
             "att.output.weight", "ffn.key.weight", "ffn.value.weight")

VARIANTS = {  # name -> W (f32) -> dequantized W (f32)
    "fp16 (baseline)": lambda W: W.astype(np.float16).astype(np.float32),
    "int8 sym B=32": lambda W: qr.dequantize_int8(*qr.quantize_int8(W, 32, False)),
    "int8 sym B=64": lambda W: qr.dequantize_int8(*qr.quantize_int8(W, 64, False)),
    "int8 sym B=128": lambda W: qr.dequantize_int8(*qr.quantize_int8(W, 128, False)),
    "int8 asym B=64": lambda W: qr.dequantize_int8(*qr.quantize_int8(W, 64, True)),
    "int8 asym B=128": lambda W: qr.dequantize_int8(*qr.quantize_int8(W, 128, True)),
    "nf4 B=64": lambda W: qr.dequantize_nf4(*qr.quantize_nf4(W)),
    # calibration: one symmetric scale for the whole tensor (block = whole row, shared scale)
    "int8 sym per-tensor": lambda W: qr.dequantize_int8(
        *_per_tensor(W)),
}


def _per_tensor(W):
    """int8 symmetric with one fp16 scale for the whole tensor, in quantize_int8's output form."""
    s = np.float16(np.abs(W).max() / 127)
    q = np.clip(np.rint(W / np.float32(s)), -127, 127).astype(np.int8).view(np.uint8)
    return qr.pack_bytes(q), np.full((W.shape[0], 1), s, np.float16), None


def build(weights):
    """(shared float64 weights, {layer key: float64 [V, M, K] stacked over variants})."""
    L = ref.dims(weights)[0]
    shared = {k: v.astype(np.float16).astype(np.float64) for k, v in weights.items()}
    stacked = {}
    for i in range(L):
        for name in QUANTIZED:
            key = f"blocks.{i}.{name}"
            stacked[key] = np.stack([f(weights[key]) for f in VARIANTS.values()]).astype(np.float64)
    return shared, stacked


def mv(W, x):
    """W [V, M, K] (or [M, K]) times x [V, K] -> [V, M]."""
    return (W @ x[..., None])[..., 0]


def forward_batched(shared, stacked, tokens, n_var, L, C, H, N, on_logits):
    """tests/support/reference.py's forward with a leading variant axis on every activation and
    state; calls on_logits(t, logits [n_var, vocab]) after each token."""
    st = {"att_shift": np.zeros((n_var, L, C)), "wkv": np.zeros((n_var, L, H, N, N)),
          "ffn_shift": np.zeros((n_var, L, C))}
    g = lambda i, k: shared[f"blocks.{i}.{k}"]
    r1 = lambda i, k: shared[f"blocks.{i}.{k}"].ravel()
    hs = lambda t: t.reshape(n_var, H, N)
    for t, tok in enumerate(tokens):
        x = ref.layer_norm(shared["emb.weight"][int(tok)], g(0, "ln0.weight"), g(0, "ln0.bias"))
        x = np.broadcast_to(x, (n_var, C)).copy()
        v_first = None
        for i in range(L):
            # time mix
            xa_ = ref.layer_norm(x, g(i, "ln1.weight"), g(i, "ln1.bias"))
            d = st["att_shift"][:, i] - xa_
            st["att_shift"][:, i] = xa_
            xr, xw, xk, xv, xa, xg = (xa_ + d * r1(i, f"att.x_{c}") for c in "rwkvag")
            r = mv(stacked[f"blocks.{i}.att.receptance.weight"], xr)
            k = mv(stacked[f"blocks.{i}.att.key.weight"], xk)
            v = mv(stacked[f"blocks.{i}.att.value.weight"], xv)
            w_raw = r1(i, "att.w0") + np.tanh(xw @ g(i, "att.w1")) @ g(i, "att.w2")
            a = ref.sigmoid(r1(i, "att.a0") + (xa @ g(i, "att.a1")) @ g(i, "att.a2"))
            gg = ref.sigmoid(xg @ g(i, "att.g1")) @ g(i, "att.g2")
            kk = ref.l2_normalize(hs(k * r1(i, "att.k_k"))).reshape(n_var, C)
            k = k * (1 + (a - 1) * r1(i, "att.k_a"))
            if i == 0:
                v_first = v
            else:
                v = v + (v_first - v) * ref.sigmoid(r1(i, "att.v0") + (xv @ g(i, "att.v1")) @ g(i, "att.v2"))
            w = np.exp(-0.606531 * ref.sigmoid(w_raw))
            st["wkv"][:, i], y = ref.wkv7_step(st["wkv"][:, i], hs(r), hs(w), hs(k), hs(v), hs(kk), hs(a))
            y = ref.group_norm(y.reshape(n_var, C), g(i, "att.ln_x.weight"), g(i, "att.ln_x.bias"), H, 64e-5)
            y = y + ((hs(r) * hs(k) * g(i, "att.r_k")).sum(-1, keepdims=True) * hs(v)).reshape(n_var, C)
            x = x + mv(stacked[f"blocks.{i}.att.output.weight"], y * gg)
            # channel mix
            xf = ref.layer_norm(x, g(i, "ln2.weight"), g(i, "ln2.bias"))
            d = st["ffn_shift"][:, i] - xf
            st["ffn_shift"][:, i] = xf
            kf = np.maximum(mv(stacked[f"blocks.{i}.ffn.key.weight"], xf + d * r1(i, "ffn.x_k")), 0.0) ** 2
            x = x + mv(stacked[f"blocks.{i}.ffn.value.weight"], kf)
        on_logits(t, ref.layer_norm(x, shared["ln_out.weight"], shared["ln_out.bias"]) @ shared["head.weight"].T)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def main():
    d = os.path.join(ref.DATA, "trained-bytes")
    weights = ref.load_safetensors(os.path.join(d, "model.safetensors"))
    text = open(os.path.join(d, "heldout.txt"), "rb").read()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else len(text)
    tokens = list(text[:n])
    L, C, H, N, _ = ref.dims(weights)
    names = list(VARIANTS)
    shared, stacked = build(weights)

    # check the batched forward against tests/support/reference.py on the first tokens
    n_chk = min(16, n)
    chk = {}
    forward_batched(shared, stacked, tokens[:n_chk], len(names), L, C, H, N,
                    lambda t, z: chk.__setitem__(t, z))
    for j in (0, len(names) - 2):
        wj = dict(shared)
        wj.update({k: v[j] for k, v in stacked.items()})
        want = ref.forward(wj, tokens[:n_chk], ref.new_state(wj))
        dev = ref.maxdev(np.stack([chk[t][j] for t in range(n_chk)]), want)
        print(f"batched vs reference.forward ({names[j]}): max abs dev {dev:.1e}")
        assert dev < 1e-9

    kl = np.zeros((n, len(names)))
    agree = np.zeros((n, len(names)), bool)
    nll = np.zeros((n - 1, len(names)))  # next-byte cross-entropy, for perplexity
    t0 = time.time()

    def on_logits(t, z):
        lp = log_softmax(z)
        kl[t] = (np.exp(lp[0]) * (lp[0] - lp)).sum(-1)
        agree[t] = z.argmax(-1) == z[0].argmax()
        if t + 1 < n:
            nll[t] = -lp[:, tokens[t + 1]]
        if (t + 1) % 2000 == 0:
            print(f"  {t + 1}/{n} tokens, {time.time() - t0:.0f} s", flush=True)

    forward_batched(shared, stacked, tokens, len(names), L, C, H, N, on_logits)
    print(f"\n{n} tokens, {time.time() - t0:.0f} s; KL(p_fp16 || p_quant) in nats\n")
    print(f"{'variant':22s} {'mean KL':>10s} {'max KL':>10s} {'top-1':>8s} {'ppl':>8s}")
    for j, name in enumerate(names):
        print(f"{name:22s} {kl[:, j].mean():10.2e} {kl[:, j].max():10.2e} {agree[:, j].mean():8.4f}"
              f" {np.exp(nll[:, j].mean()):8.4f}")


if __name__ == "__main__":
    main()
