"""NumPy reference of the two weight-quantization formats. Test oracle only, never product code.

A weight matrix W [M out rows, K in columns] (y = W x) is quantized in blocks of
consecutive columns of one row (blocks run along K, so K % block == 0).

int8 (`quantize_int8`, `dequantize_int8`), one fp16 scale per block:
  symmetric:  scale = f16(absmax / 127), q = clip(rint(w / scale), -127, 127),  w ~ q * scale
  asymmetric: scale = f16((max - min) / 255), offset = f16(min),
              q = clip(rint((w - offset) / scale), 0, 255),                     w ~ offset + q * scale
  The scale (and offset) are rounded to fp16 *before* quantizing, and quantization is
  done against the rounded values, so dequantization with the stored fp16 is exact to them.
  Codes are stored 4 per u32, little-endian: the code of column k is byte k % 4 of
  word k // 4 (signed codes as two's-complement bytes).

nf4 (`quantize_nf4`, `dequantize_nf4`), QLoRA's NormalFloat codebook `NF4`, blocks of 64:
  absmax = f16(max |w|), code = index of the codebook value nearest to w / absmax,
  w ~ NF4[code] * absmax. Codes are stored 8 per u32: column k is nibble k % 8 of
  word k // 8, low nibble first.

Arithmetic: all per-element work is float32 (w / scale, the midpoint comparisons, the
dequantized products), so a Rust/WGSL implementation in f32 reproduces the codes.
Rounding: `np.rint` = round half to even (Rust `f32::round_ties_even`, WGSL `round`).
Nearest-codebook ties (w / absmax exactly on a midpoint) go to the LOWER codebook value
(`searchsorted(..., side="left")`), as in bitsandbytes' dQuantizeNF4 (`x > mid`).
A block of all zeros gets scale 0 and codes that dequantize to 0.
"""
import numpy as np

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176514, 0.7229568362236328, 1.0], dtype=np.float32)
NF4_MID = ((NF4[:-1] + NF4[1:]) / np.float32(2)).astype(np.float32)  # 15 decision thresholds
NF4_BLOCK = 64


# ---- packing: codes [M, K] <-> u32 words [M, K / per_word] ----

def pack_bytes(codes):
    """uint8 [M, K] (K % 4 == 0) -> uint32 [M, K/4]; column k is byte k%4 of word k//4."""
    c = np.asarray(codes, np.uint8).astype(np.uint32).reshape(codes.shape[0], -1, 4)
    return (c[..., 0] | c[..., 1] << 8 | c[..., 2] << 16 | c[..., 3] << 24).astype(np.uint32)


def unpack_bytes(words):
    """uint32 [M, K/4] -> uint8 [M, K] (inverse of pack_bytes)."""
    w = np.asarray(words, np.uint32)[..., None] >> (8 * np.arange(4, dtype=np.uint32))
    return (w & 0xFF).astype(np.uint8).reshape(words.shape[0], -1)


def pack_nibbles(codes):
    """uint8 [M, K] with values < 16 (K % 8 == 0) -> uint32 [M, K/8]; column k is nibble
    k%8 of word k//8, low nibble first."""
    c = np.asarray(codes, np.uint8).astype(np.uint32).reshape(codes.shape[0], -1, 8)
    assert (c < 16).all()
    return np.bitwise_or.reduce(c << (4 * np.arange(8, dtype=np.uint32)), axis=-1).astype(np.uint32)


def unpack_nibbles(words):
    """uint32 [M, K/8] -> uint8 [M, K] (inverse of pack_nibbles)."""
    w = np.asarray(words, np.uint32)[..., None] >> (4 * np.arange(8, dtype=np.uint32))
    return (w & 0xF).astype(np.uint8).reshape(words.shape[0], -1)


def _blocks(W, block):
    """float32 view [M, K/block, block] of W."""
    W = np.asarray(W, np.float32)
    M, K = W.shape
    assert K % block == 0, f"K={K} not a multiple of block={block}"
    return W.reshape(M, K // block, block)


def _safe(s):
    """fp16 scale -> float32 divisor, with 0 replaced by 1 (an all-zero block)."""
    s = s.astype(np.float32)
    return np.where(s == 0, np.float32(1), s)


# ---- int8 ----

def quantize_int8(W, block=64, asymmetric=False):
    """Blockwise int8 along K. W float [M, K].
    Returns (codes uint32 [M, K/4], scales float16 [M, K/block], offsets float16 [M, K/block]
    or None when symmetric). Symmetric codes are int8 in [-127, 127] stored as bytes;
    asymmetric codes are uint8 in [0, 255]."""
    b = _blocks(W, block)
    if asymmetric:
        lo, hi = b.min(-1), b.max(-1)
        scales = ((hi - lo) / np.float32(255)).astype(np.float16)
        offsets = lo.astype(np.float16)
        x = (b - offsets.astype(np.float32)[..., None]) / _safe(scales)[..., None]
        q = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    else:
        scales = (np.abs(b).max(-1) / np.float32(127)).astype(np.float16)
        offsets = None
        x = b / _safe(scales)[..., None]
        q = np.clip(np.rint(x), -127, 127).astype(np.int8).view(np.uint8)
    return pack_bytes(q.reshape(b.shape[0], -1)), scales, offsets


def dequantize_int8(codes, scales, offsets=None):
    """Inverse of quantize_int8 -> float32 [M, K]. The block size is K / scales.shape[1];
    symmetric iff offsets is None."""
    q = unpack_bytes(codes)
    M, K = q.shape
    nb = scales.shape[1]
    if offsets is None:
        v = q.view(np.int8).astype(np.float32).reshape(M, nb, -1)
        return (v * scales.astype(np.float32)[..., None]).reshape(M, K)
    v = q.astype(np.float32).reshape(M, nb, -1)
    return (offsets.astype(np.float32)[..., None] + v * scales.astype(np.float32)[..., None]).reshape(M, K)


# ---- nf4 ----

def nf4_index(x):
    """Index of the NF4 value nearest to each float32 x (x is w / absmax, nominally in [-1, 1];
    values outside map to the end codes). Ties (x on a midpoint) go to the lower value."""
    return np.searchsorted(NF4_MID, np.asarray(x, np.float32), side="left").astype(np.uint8)


def quantize_nf4(W):
    """Blockwise NF4 along K (blocks of 64). W float [M, K].
    Returns (codes uint32 [M, K/8], absmax float16 [M, K/64])."""
    b = _blocks(W, NF4_BLOCK)
    absmax = np.abs(b).max(-1).astype(np.float16)
    q = nf4_index(b / _safe(absmax)[..., None])
    return pack_nibbles(q.reshape(b.shape[0], -1)), absmax


def dequantize_nf4(codes, absmax):
    """Inverse of quantize_nf4 -> float32 [M, K]."""
    q = unpack_nibbles(codes)
    M, K = q.shape
    v = NF4[q].reshape(M, K // NF4_BLOCK, NF4_BLOCK)
    return (v * absmax.astype(np.float32)[..., None]).reshape(M, K)


if __name__ == "__main__":  # self-check on random data
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 256)).astype(np.float32) * 0.05
    c = rng.integers(0, 256, (3, 16)).astype(np.uint8)
    assert (unpack_bytes(pack_bytes(c)) == c).all() and (unpack_nibbles(pack_nibbles(c & 15)) == c & 15).all()
    assert pack_bytes(np.array([[1, 2, 3, 4]], np.uint8))[0, 0] == 0x04030201
    assert pack_nibbles(np.array([[1, 2, 3, 4, 5, 6, 7, 8]], np.uint8))[0, 0] == 0x87654321
    for blk in (32, 64, 128):
        for asym in (False, True):
            d = dequantize_int8(*quantize_int8(W, blk, asym))
            print(f"int8 B={blk:3d} {'asym' if asym else 'sym '} rel rms err {np.sqrt(((d - W) ** 2).mean() / (W ** 2).mean()):.2e}")
    d = dequantize_nf4(*quantize_nf4(W))
    print(f"nf4  B= 64      rel rms err {np.sqrt(((d - W) ** 2).mean() / (W ** 2).mean()):.2e}")
    assert (nf4_index(NF4_MID) == np.arange(15)).all()  # ties go to the lower value
    assert (nf4_index(NF4) == np.arange(16)).all()
