"""World tokenizer encode speed on the Python standard library's .py sources.
Run: python -m pytest benches/test_tokenizer_speed.py --benchmark-only
MB/s is in each result's extra_info."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import rwkv_gpu


@pytest.fixture(scope="module")
def stdlib_text() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def test_encode_stdlib(benchmark, stdlib_text):
    tok = rwkv_gpu.Tokenizer.world()
    data = stdlib_text
    n_bytes = len(data.encode("utf-8"))
    ids = benchmark.pedantic(tok.encode, args=(data,), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["bytes"] = n_bytes
    benchmark.extra_info["tokens"] = len(ids)
    benchmark.extra_info["MB_per_s"] = n_bytes / 1e6 / benchmark.stats.stats.mean
