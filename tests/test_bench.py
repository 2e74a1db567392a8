"""`python -m rwkv_gpu.bench` on the tiny model: the rows, the output formats and the
--profile counts (not its timings, which say nothing on a software adapter)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from conftest import DATA

TINY = str(DATA / "tiny-rwkv7" / "model.safetensors")
ARGS = ["--model", TINY, "-p", "20", "-n", "3", "-r", "2", "--depth", "0,16"]


def bench(*extra):
    done = subprocess.run([sys.executable, "-m", "rwkv_gpu.bench", *ARGS, *extra], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def table():
    return bench("--profile", "--batch", "3")


def test_table_rows_and_profile_counts(table):
    lines = table.stdout.splitlines()
    assert lines[0].startswith("adapter: ") and "backend: " in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert lines[header].split("|")[1:8] == [" model ", " dtype ", " quant_int8 ", " quant_nf4 ", " test ", " t/s ", " memory "]
    body = lines[header + 2:]
    body = body[:body.index("")] if "" in body else body  # the per-kernel tables follow a blank line
    rows = {cells[5].strip(): cells for cells in (line.split("|") for line in body)}
    assert list(rows) == ["pp20", "tg3", "tg3-argmax", "tg3 @ d16", "tg3-argmax @ d16", "tg3 x3", "tg3 x3 engine", "ttft20",
                          "ttft20 cached 4"]
    for cells in rows.values():
        mean, _, std = cells[6].split()[:3]
        assert float(mean) > 0 and float(std) >= 0
        assert cells[2].strip() == "fp16" and cells[7].strip().endswith("GB")
    # Decode: 7 dispatches per layer, one submission and one read-back per token.
    for test in ("tg3", "tg3-argmax", "tg3 @ d16"):
        assert [float(c) for c in rows[test][8:11]] == [7.0, 1.0, 1.0], test
    # Three sequences: each step is one pass over the weights for all three tokens.
    assert [float(c) for c in rows["tg3 x3"][8:11]] == [7.0, round(1 / 3, 2), round(1 / 3, 2)]
    # The same three through the Engine (its rows carry no per-call counts).
    assert [c.strip() for c in rows["tg3 x3 engine"][8:12]] == ["-"] * 4
    # Prefill of 20 tokens: one chunk (the low-rank second stages as their own matmul,
    # the WKV in three passes), one read-back of the last logits.
    assert [float(c) for c in rows["pp20"][8:11]] == [10.0, 1 / 20, 1 / 20]
    # Host time per submission is measured (its size is the bench's business, not a test's).
    assert all(float(cells[11]) > 0 for cells in rows.values() if cells[11].strip() != "-")
    # The bandwidth bound, and each single-sequence tg row's share of it.
    bandwidth = next(line for line in lines if line.startswith("copy bandwidth: "))
    assert float(bandwidth.split()[2]) > 0 and "decode bound" in bandwidth
    shares = [line.split(":")[0] for line in lines if line.endswith("% of the bandwidth bound")]
    assert shares == ["tg3", "tg3-argmax", "tg3 @ d16", "tg3-argmax @ d16"]
    # Per-kernel GPU times for pp and tg (lavapipe has timestamp queries).
    assert "GPU time per kernel, tg3 (one decode step" in table.stdout or "no per-kernel GPU times" in table.stdout
    # Progress and warnings go to stderr, never into the table.
    assert "run 1/2" in table.stderr and "run 1/2" not in table.stdout


def test_json_and_csv_carry_the_same_rows():
    data = json.loads(bench("--json").stdout)
    assert data["info"]["n_layer"] == 2 and data["info"]["memory"]["head"] > 0
    assert data["info"]["weight_bytes_per_token"] > data["info"]["memory"]["head"]
    info = data["info"]
    assert info["copy_bandwidth"] > 0
    assert info["tg_bound"] == pytest.approx(info["copy_bandwidth"] / info["weight_bytes_per_token"])
    tg = next(r for r in data["rows"] if r["test"] == "tg3")
    assert tg["fraction_of_bound"] == pytest.approx(tg["mean"] / info["tg_bound"])
    assert [r["test"] for r in data["rows"]][:3] == ["pp20", "tg3", "tg3-argmax"]
    rows = list(csv.DictReader(io.StringIO(bench("--csv").stdout)))
    assert [r["test"] for r in rows] == [r["test"] for r in data["rows"]]
    assert all(float(r["mean"]) > 0 for r in rows)


def test_bad_arguments_are_refused():
    done = subprocess.run([sys.executable, "-m", "rwkv_gpu.bench", *ARGS[:2], "--depth", "x"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--depth takes comma-separated integers" in done.stderr
    done = subprocess.run([sys.executable, "-m", "rwkv_gpu.bench", *ARGS[:2], "--batch", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "batch sizes must be at least 1" in done.stderr
