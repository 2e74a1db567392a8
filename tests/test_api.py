"""The Python API: states, errors that leave everything as it was, threads."""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, open_model


def test_config_and_repr(tiny_model):
    c = tiny_model.config
    assert (c["n_layer"], c["n_embd"], c["n_head"], c["head_size"], c["vocab_size"]) == (2, 128, 2, 64, 512)
    assert c["dtype"] == "fp16" and c["backend"] in ("vulkan", "metal", "dx12", "gl")
    assert "L2 C128 V512" in repr(tiny_model)


def test_adapters_lists_dicts():
    adapters = rwkv_gpu.adapters()
    assert adapters and {"name", "backend", "device_type", "max_storage_binding"} <= set(adapters[0])


def test_unknown_adapter_is_a_clear_error():
    with pytest.raises(rwkv_gpu.DeviceError, match='no adapter matches "no-such-gpu"; available adapters'):
        open_model(DATA / "tiny-rwkv7" / "model.safetensors", adapter="no-such-gpu")


def test_state_numpy_round_trip_and_continue(tiny_model, tiny_cases):
    prompt = tiny_cases["prompt"]
    a = tiny_model.new_state()
    tiny_model.prefill(prompt, a)
    b = tiny_model.state_from_numpy(a.to_numpy())
    np.testing.assert_array_equal(tiny_model.forward([5], a), tiny_model.forward([5], b))


def test_save_load_continue_equals_never_saving(tiny_model, tiny_cases, tmp_path):
    prompt = tiny_cases["prompt"]
    a = tiny_model.new_state()
    tiny_model.prefill(prompt, a)
    a.save(tmp_path / "s.safetensors")
    b = tiny_model.load_state(tmp_path / "s.safetensors")
    np.testing.assert_array_equal(tiny_model.forward([7, 8], a), tiny_model.forward([7, 8], b))


def test_state_from_another_model_is_refused(tiny_model, tmp_path):
    other = open_model(DATA / "trained-bytes" / "model.safetensors")
    s = other.new_state()
    s.save(tmp_path / "other.safetensors")
    with pytest.raises(rwkv_gpu.StateError, match="another model"):
        tiny_model.load_state(tmp_path / "other.safetensors")
    with pytest.raises(rwkv_gpu.StateError, match="another model"):
        tiny_model.forward([1], s)


def test_clone_is_independent(tiny_model):
    a = tiny_model.new_state()
    tiny_model.forward([1, 2, 3], a)
    b = a.clone()
    snapshot = b.to_numpy()
    from_a = tiny_model.forward([4], a)
    for k, v in b.to_numpy().items():
        np.testing.assert_array_equal(v, snapshot[k])  # advancing a left b alone
    np.testing.assert_array_equal(tiny_model.forward([4], b), from_a)


@pytest.mark.parametrize(
    "tokens, error, match",
    [
        ([], rwkv_gpu.ShapeError, "empty"),
        ([1, 512], rwkv_gpu.ShapeError, "token id 512 at position 1 is out of range"),
        ([-1], rwkv_gpu.ShapeError, "token id -1"),
        ("hello", rwkv_gpu.ShapeError, "not text"),
        (np.zeros((2, 2), dtype=np.int64), rwkv_gpu.ShapeError, "1-D"),
        (np.zeros(3, dtype=np.float32), rwkv_gpu.ShapeError, "integer"),
    ],
)
def test_bad_tokens_leave_state_unchanged(tiny_model, tokens, error, match):
    s = tiny_model.new_state()
    tiny_model.forward([3, 4], s)
    before = s.to_numpy()
    with pytest.raises(error, match=match):
        tiny_model.forward(tokens, s)
    after = s.to_numpy()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_bad_state_arrays(tiny_model):
    good = tiny_model.new_state().to_numpy()
    with pytest.raises(rwkv_gpu.ShapeError, match="wkv has shape"):
        tiny_model.state_from_numpy({**good, "wkv": good["wkv"][:1]})
    with pytest.raises(rwkv_gpu.ShapeError, match="missing 'ffn_shift'"):
        tiny_model.state_from_numpy({"att_shift": good["att_shift"], "wkv": good["wkv"]})
    # The core's own checks, under the Python ones: a byte count that is not whole f32
    # values (one byte short of the right count) is refused, not padded with zeros.
    parts = [np.ascontiguousarray(good[k], dtype=np.float32).tobytes() for k in ("att_shift", "wkv", "ffn_shift")]
    with pytest.raises(rwkv_gpu.ShapeError, match=f"wkv has {len(parts[1]) - 1} bytes: not a whole number"):
        tiny_model._m.state_from_host(parts[0], parts[1][:-1], parts[2])
    with pytest.raises(rwkv_gpu.ShapeError, match="att_shift has 1 values"):
        tiny_model._m.state_from_host(parts[0][:4], parts[1], parts[2])


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "too short"),
        (b"PK\x03\x04" + b"\0" * 40, "zip|central directory|truncated"),
        (b"\xff" * 64, "not a checkpoint"),
    ],
)
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.pth"
    p.write_bytes(content)
    with pytest.raises(rwkv_gpu.ModelLoadError, match=match):
        open_model(p)


def test_missing_file():
    with pytest.raises(rwkv_gpu.ModelLoadError) as info:
        open_model(DATA / "nope.pth")
    assert isinstance(info.value, FileNotFoundError) and info.value.errno == errno.ENOENT
    assert info.value.filename == str(DATA / "nope.pth")


def test_truncated_safetensors(tmp_path):
    data = (DATA / "tiny-rwkv7" / "model.safetensors").read_bytes()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(rwkv_gpu.ModelLoadError):
        open_model(p)


def test_foreign_and_incomplete_checkpoints(tmp_path):
    from support.pth_writer import write_pth

    v6 = {"emb.weight": np.zeros((8, 64), np.float16), "blocks.0.att.time_maa_x": np.zeros((1, 1, 64), np.float16)}
    write_pth(tmp_path / "v6.pth", v6)
    with pytest.raises(rwkv_gpu.ModelLoadError, match="RWKV-6"):
        open_model(tmp_path / "v6.pth")
    partial = {"emb.weight": np.zeros((8, 64), np.float16), "blocks.0.att.r_k": np.zeros((1, 64), np.float16)}
    write_pth(tmp_path / "partial.pth", partial)
    with pytest.raises(rwkv_gpu.ModelLoadError, match="missing tensor"):
        open_model(tmp_path / "partial.pth")


def test_closed_model_raises(tmp_path):
    m = open_model(DATA / "tiny-rwkv7" / "model.safetensors")
    with m:
        pass
    with pytest.raises(rwkv_gpu.RwkvError, match="closed"):
        m.new_state()


def test_random_model_runs():
    m = rwkv_gpu.Model.random(2, 128, vocab_size=1000, seed=3)
    assert m.config["lora_widths"] == (32, 32, 32, 32)
    out = m.forward([1, 999], m.new_state())
    assert out.shape == (1000,) and np.isfinite(out).all()
    with pytest.raises(rwkv_gpu.ShapeError, match="multiple of 64"):
        rwkv_gpu.Model.random(2, 100)


@pytest.mark.parametrize("args", [(0, 64), (1025, 64), (10**5, 64), (2, 0), (2, 2**40), (2, 32768 + 64),
                                  (2, 64, 0), (2, 64, 2**22 + 1)])
def test_random_model_sizes_beyond_the_bounds_are_shape_errors(args):
    """Checked before anything is built from them (a layer count of 10**5 used to build
    the names of every layer's tensors first), as a ValueError naming the bounds."""
    with pytest.raises(rwkv_gpu.ShapeError, match=r"n_layer in 1\.\.=1024.*\(got " + ", ".join(map(str, args))):
        rwkv_gpu.Model.random(*args)
    assert issubclass(rwkv_gpu.ShapeError, ValueError)


def test_threads_share_a_model_but_not_a_state(tiny_model, tiny_cases):
    """Threads with their own states get the same answer as running alone."""
    prompt = tiny_cases["prompt"]
    expected = tiny_model.forward(prompt, tiny_model.new_state())
    results, errors = [], []

    def work():
        try:
            results.append(tiny_model.forward(prompt, tiny_model.new_state()))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    for r in results:
        np.testing.assert_array_equal(r, expected)



def test_a_state_used_by_two_threads_at_once_is_a_state_error(tiny_model, tiny_cases):
    """Thread A holds the state through a long prefill (seconds on lavapipe); thread B
    tries it 0.3 s after A went in and must get StateError, not wait or run. A's call then
    finishes as if alone."""
    shared = tiny_model.new_state()
    tokens = [i % 512 for i in range(4096)]
    started, outcome = threading.Event(), {}

    def long_call():
        started.set()
        tiny_model.prefill(tokens, shared)
        outcome["a"] = "done"

    a = threading.Thread(target=long_call)
    a.start()
    started.wait()
    time.sleep(0.3)
    with pytest.raises(rwkv_gpu.StateError, match="another thread"):
        tiny_model.forward([1], shared)
    a.join()
    alone = tiny_model.new_state()
    tiny_model.prefill(tokens, alone)
    assert outcome == {"a": "done"}
    for k, v in shared.to_numpy().items():
        np.testing.assert_array_equal(v, alone.to_numpy()[k])


def test_gil_is_released_during_gpu_work(tiny_model, tiny_cases):
    """While one thread runs forward(), another keeps running Python: the longest pause
    the busy thread sees is far shorter than the forward call itself."""
    prompt = np.tile(tiny_cases["prompt"], 8)
    done = threading.Event()
    span = {}

    def work():
        import time

        start = time.perf_counter()
        tiny_model.forward(prompt, tiny_model.new_state(), all_logits=True)
        span["forward"] = time.perf_counter() - start
        done.set()

    import time

    t = threading.Thread(target=work)
    last = time.perf_counter()
    longest = 0.0
    t.start()
    while not done.is_set():
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    t.join()
    assert span["forward"] > 0.05, "forward too short to tell"
    assert longest < span["forward"] / 2, (longest, span["forward"])


def test_memory_report_counts_one_state_exactly():
    """A model with one live state holds exactly that state's bytes: L x (2C + C*64) f32."""
    m = open_model(DATA / "tiny-rwkv7" / "model.safetensors")
    s = m.new_state()
    m.forward([1, 2], s)
    mem = m.memory()
    assert mem["states"] == 2 * (2 * 128 + 128 * 64) * 4
    # Weights: every matrix as fp16 plus f32 vectors; the head is 512 x 128 fp16.
    assert mem["head"] == 512 * 128 * 2
    assert mem["scratch"] > 0 and mem["weights_int8"] == mem["weights_nf4"] == mem["embeddings"] == 0


def test_load_and_quantize_report_progress_to_a_callback():
    """progress(done, total) after every tensor, loading and quantizing alike, up to
    total; an exception raised by the callback stops the load and is what Model raises."""
    for dtype in (None, "int8"):
        seen: list[tuple[int, int]] = []
        open_model(DATA / "tiny-rwkv7" / "model.safetensors", dtype=dtype, progress=lambda d, t, seen=seen: seen.append((d, t)))
        assert seen and all(t == seen[0][1] for _, t in seen)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == seen[-1][1]

    class Stop(Exception):
        pass

    def stop_at_five(done, total):
        if done == 5:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        open_model(DATA / "tiny-rwkv7" / "model.safetensors", progress=stop_at_five)


def test_long_generation_keeps_host_and_device_memory_flat():
    """2000 generated tokens after a warm-up: the process's resident memory grows by
    under 1% and the model's device memory not at all. (Before the constant-bound loop
    in ln_shift.wgsl, lavapipe leaked ~0.6 MB per forward call: 1.2 GB here.) The
    100,000-token run is `benches/long_run.py`."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    model = open_model(DATA / "trained-bytes" / "model.safetensors")
    state = model.new_state()
    run = lambda n, seed: sum(1 for _ in model.generate("import os\n", state=state, max_tokens=n, temperature=1.0, seed=seed, stop_tokens=()))
    run(300, 1)  # warm-up: every kernel variant and program this loop uses, compiled once
    before, device = rss(), model.memory()
    assert run(2000, 2) == 2000
    assert rss() < before * 1.01, (before, rss())
    assert model.memory() == device


def test_copy_bandwidth_refuses_what_it_cannot_record(tiny_model):
    """The bench's bandwidth probe records every copy into one submission: a repetition
    count past its cap is refused at once (it was recorded whole, without Ctrl-C)."""
    with pytest.raises(rwkv_gpu.InvalidOptionError, match="1 to 1000 repetitions"):
        tiny_model._m.copy_bandwidth(1 << 20, 10**6)
    with pytest.raises(rwkv_gpu.InvalidOptionError, match="at least 16 bytes"):
        tiny_model._m.copy_bandwidth(8, 1)
    assert tiny_model._m.copy_bandwidth(1 << 16, 2) > 0
