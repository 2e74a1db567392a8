"""Writes .safetensors files for tests, byte for byte as the format specifies (an 8-byte
header length, the JSON header, the tensors back to back), so that tests can make
variants and hostile files without the safetensors package."""

from __future__ import annotations

import json
import struct

import numpy as np

# bf16 has no numpy dtype: its raw bits are passed as uint16.
DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.uint16): "BF16",
          np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8"}


def header_bytes(entries: dict[str, tuple[str, list[int], int]], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header for tensors given as name -> (dtype, shape, bytes)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape, size) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    blobs = {name: np.ascontiguousarray(a).tobytes() for name, a in tensors.items()}
    entries = {name: (DTYPES[a.dtype], list(a.shape), len(blobs[name])) for name, a in tensors.items()}
    with open(path, "wb") as f:
        f.write(header_bytes(entries, metadata) + b"".join(blobs.values()))


def read_raw(path) -> dict[str, np.ndarray]:
    """{name: array} with bf16 kept as its uint16 bits, so a rewrite is bit-exact."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    numpy = {"F16": "<f2", "F32": "<f4", "BF16": "<u2", "I8": "i1", "U8": "u1"}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(buf[8 + n + lo:8 + n + hi], numpy[info["dtype"]]).reshape(info["shape"]).copy()
    return out
