"""Write PyTorch `.pth` checkpoints without torch, for tests.

The layout is torch.save's zip format: `<prefix>/data.pkl`, a protocol-2 pickle of a dict
of tensors (emitted opcode by opcode below, the way torch emits it), and one stored entry
`<prefix>/data/<key>` per storage. Tests can thus build checkpoints in any dtype and layout
(shared storages, transposed views, zip64) without installing torch.
"""

import struct
import zlib

import numpy as np

STORAGE = {"f16": "HalfStorage", "bf16": "BFloat16Storage", "f32": "FloatStorage"}
# bf16 has no numpy dtype: callers pass its raw bits as uint16.
NUMPY = {"f16": "<f2", "bf16": "<u2", "f32": "<f4"}


def write_pth(path, tensors, *, prefix="archive", zip64=False, share_storage=False, transpose=(), expand=None):
    """Write `tensors` (name -> float16/float32 array, or (array, "f16" | "bf16" | "f32"))
    as a state dict.

    share_storage: tensors of one dtype share one storage, each at its own offset.
    transpose: names of 2-D tensors to store column-major, i.e. as a non-contiguous view
        with strides (1, rows); the tensor read back is still the array given.
    zip64: write zip64 records (as torch always does) even for small files.
    expand: name -> rows: store the 1-D array given once and record a [rows, n] view with
        stride 0 along the rows (as `tensor.expand` makes), claiming far more than is stored.
    """
    keys, storages, views = {}, {}, []
    for name, value in tensors.items():
        arr, dtype = value if isinstance(value, tuple) else (value, _dtype_of(value))
        arr = np.asarray(arr).astype(NUMPY[dtype])
        if expand and name in expand:
            assert arr.ndim == 1, f"{name}: give the one row that the expanded view repeats"
            key = keys.setdefault(name, str(len(keys)))
            storages.setdefault(key, []).append(arr.tobytes())
            views.append((name, dtype, key, 0, (expand[name], arr.shape[0]), (0, 1)))
            continue
        if name in transpose:
            assert arr.ndim == 2, f"{name}: only 2-D tensors can be stored transposed"
            data, stride = arr.T, (1, arr.shape[0])
        else:
            data, stride = arr, tuple(int(np.prod(arr.shape[i + 1 :])) for i in range(arr.ndim))
        key = keys.setdefault(dtype if share_storage else name, str(len(keys)))
        chunks = storages.setdefault(key, [])
        offset = sum(len(c) for c in chunks) // arr.itemsize
        chunks.append(data.tobytes(order="C"))
        views.append((name, dtype, key, offset, arr.shape, stride))

    blobs = {k: b"".join(c) for k, c in storages.items()}
    numel = {k: len(blobs[k]) // np.dtype(NUMPY[d]).itemsize for _, d, k, *_ in views}
    entries = [("data.pkl", _pickle(views, numel)), ("byteorder", b"little")]
    entries += [(f"data/{k}", b) for k, b in blobs.items()]
    entries += [("version", b"3\n")]
    _write_zip(path, [(f"{prefix}/{n}", d) for n, d in entries], zip64)


def _dtype_of(arr):
    kinds = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}
    if arr.dtype not in kinds:
        raise ValueError(f"pass (array, dtype) for {arr.dtype} arrays (bf16 bits as uint16)")
    return kinds[arr.dtype]


def _pickle(views, numel):
    """{name: _rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())}"""
    out = b"\x80\x02}("  # PROTO 2, EMPTY_DICT, MARK
    for name, dtype, key, offset, shape, stride in views:
        out += _str(name) + _global("torch._utils", "_rebuild_tensor_v2") + b"(("  # MARK MARK
        out += _str("storage") + _global("torch", STORAGE[dtype]) + _str(key) + _str("cpu")
        out += _int(numel[key]) + b"tQ"  # TUPLE: the persistent id; BINPERSID
        out += _int(offset) + _tuple(shape) + _tuple(stride) + b"\x89"  # requires_grad=False
        out += _global("collections", "OrderedDict") + b")R"  # backward_hooks = OrderedDict()
        out += b"tR"  # TUPLE of the arguments, REDUCE
    return out + b"u."  # SETITEMS, STOP


def _str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _int(i):
    if i < 2**31:
        return b"J" + struct.pack("<i", i)  # BININT
    b = i.to_bytes(i.bit_length() // 8 + 1, "little")
    return b"\x8a" + bytes([len(b)]) + b  # LONG1


def _tuple(xs):
    return b"(" + b"".join(_int(x) for x in xs) + b"t"


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _write_zip(path, entries, zip64):
    """Stored entries whose data start on 64-byte boundaries (torch pads the local extra
    field the same way), then the central directory and end records."""
    central = b""
    with open(path, "wb") as f:
        for name, data in entries:
            name, offset, crc, size = name.encode(), f.tell(), zlib.crc32(data), len(data)
            pad = -(offset + 30 + len(name) + 4) % 64
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, size, size, len(name), 4 + pad))
            f.write(name + struct.pack("<HH", 0x4246, pad) + b"\0" * pad + data)
            if zip64:  # the real values move to the zip64 extra field
                extra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
                size, offset = 0xFFFFFFFF, 0xFFFFFFFF
            else:
                extra = b""
            central += struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc, size, size,
                len(name), len(extra), 0, 0, 0, 0, offset,
            ) + name + extra
        count, cd_offset = len(entries), f.tell()
        f.write(central)
        if zip64:
            record = f.tell()
            f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(central), cd_offset))
            f.write(struct.pack("<IIQI", 0x07064B50, 0, record, 1))
            count, cd_offset = 0xFFFF, 0xFFFFFFFF
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), cd_offset, 0))
