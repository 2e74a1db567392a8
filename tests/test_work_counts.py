"""The work a forward pass records, counted by the runtime itself (`_m.last_stats()`:
queue submissions, compute dispatches, read-backs; `_m.created()`: device objects), so
that fusions and the program cache cannot silently regress. Per layer, a decode step
(up to FUSED_LORA_TOKENS = 4 tokens in the chunk) records 7 dispatches:

    ln1 + token shift (6 mixes), r/k/v with the four low-rank first stages (one grouped
    matmul), wkv7 with the low-rank second stages, output (+ residual), ln2 + token
    shift (ffn), ffn key (relu^2), ffn value (+ residual)

and bigger chunks 8 (the second stages as their own matmul, which reads each weight
once for all tokens), or 10 from WKV_STAGED_TOKENS = 8 tokens per sequence on (the WKV
in three passes: prepare, recurrence, finish); plus ln0 once per chunk and ln_out + one head matmul per head row
chunk for the tokens whose logits are read. Targets (issue 12): at most 7 per layer for
decode, one submission and one read-back per generated token, and no buffer, bind group
or pipeline created per step once a chunk shape has run.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA, open_model

DECODE_PER_LAYER = 7
CHUNK_PER_LAYER = 8
STAGED_PER_LAYER = 10
TINY = DATA / "tiny-rwkv7" / "model.safetensors"
# Scratch besides the activations: the sequence table, argmax results and draws (64
# sequences of 16, 8 and 32 bytes) and the draws' first 1024 penalty entries of 16 bytes.
TABLES = 64 * 16 + 64 * 8 + 64 * 32 + 1024 * 16


@pytest.fixture(scope="module", params=["fp16", "int8", "nf4"])
def model(request):
    return open_model(TINY, dtype=request.param)


def stats(model):
    submissions, dispatches, readbacks, _ = model._m.last_stats()
    return submissions, dispatches, readbacks


def test_decode_step_counts(model):
    layers = model.config["n_layer"]
    state = model.new_state()
    model.forward([5], state)
    submissions, dispatches, readbacks = stats(model)
    assert (submissions, readbacks) == (1, 1)
    assert dispatches == DECODE_PER_LAYER * layers + 3  # + ln0, ln_out, head
    assert model._m.last_stats()[3] == DECODE_PER_LAYER * layers


def test_prefill_counts_per_chunk(model):
    layers = model.config["n_layer"]
    state = model.new_state()
    # Chunks of the device's chunk (256 tokens on CPU devices) + 44 tokens, the first cut
    # into pieces of at least 64 to the measured speed (interruptible calls pace their
    # chunks): 2 to chunk / 64 + 1 submissions, each one chunk.
    chunk = model.config["chunk_tokens"]
    model.forward([t % 256 for t in range(chunk + 44)], state)
    submissions, dispatches, readbacks = stats(model)
    assert 2 <= submissions <= chunk // 64 + 1 and readbacks == 1
    assert dispatches == submissions * (STAGED_PER_LAYER * layers + 1) + 2
    assert model._m.last_stats()[3] == submissions * STAGED_PER_LAYER * layers
    model.prefill(list(range(10)), state)
    assert stats(model) == (1, STAGED_PER_LAYER * layers + 1, 0)
    model.prefill(list(range(4)), state)  # a chunk small enough for the fused second stages
    assert stats(model) == (1, DECODE_PER_LAYER * layers + 1, 0)
    # Two sequences of 5 tokens: too many tokens for the fused second stages, too few
    # per sequence for the three-pass WKV (the rest as for two sequences of 2 tokens).
    model.forward_batch([[1, 2], [3, 4]], model.new_states(2))
    outside_layers = stats(model)[1] - DECODE_PER_LAYER * layers
    model.forward_batch([list(range(5)), list(range(5, 10))], model.new_states(2))
    assert stats(model) == (1, CHUNK_PER_LAYER * layers + outside_layers, 1)


def test_a_steady_decode_step_creates_nothing(model):
    """After the first step of a shape, decode steps (logits, argmax, prefill) reuse the
    recorded program: no buffer, bind group or pipeline is created, and the results are
    those of a fresh model."""
    state = model.new_state()
    for want in ("logits", "argmax", "none"):
        model.forward([1], state) if want == "logits" else model.forward_argmax([1], state) if want == "argmax" else model.prefill([1], state)
    before = model._m.created()
    token, chosen = 2, []
    for _ in range(5):
        model.forward([token], state)
        token = model.forward_argmax([token], state)
        model.prefill([token], state)
        chosen.append(token)
    assert model._m.created() == before
    fresh = open_model(TINY, dtype=model.weight_formats()["blocks.0.att.key"])
    again, token, expected = fresh.new_state(), 2, []
    for want in ("logits", "argmax", "none"):
        fresh.forward([1], again) if want == "logits" else fresh.forward_argmax([1], again) if want == "argmax" else fresh.prefill([1], again)
    for _ in range(5):
        fresh.forward([token], again)
        token = fresh.forward_argmax([token], again)
        fresh.prefill([token], again)
        expected.append(token)
    assert chosen == expected
    np.testing.assert_array_equal(state.to_numpy()["wkv"], again.to_numpy()["wkv"])


def test_programs_go_with_their_state_page(model):
    """The recorded programs live on the state page they bind: a page of states that
    are all dropped is freed with its programs (the memory report shows it)."""
    model.forward_batch([[1], [2], [3]], model.new_states(3))  # scratch and pipelines made
    base, live = model.memory()["states"], model._m.allocator_report()
    states = model.new_states(3)
    model.forward_batch([[1], [2], [3]], states)
    page = model.memory()["states"] - base
    assert page > 0
    del states
    assert model.memory()["states"] == base
    if live is not None:  # the device allocator's own count: the page's buffers are gone
        assert model._m.allocator_report()[0] <= live[0]


def test_split_matrices_fall_back_to_one_dispatch_per_chunk(monkeypatch):
    """With a 64 KiB binding limit the tiny model's r/k/v (3 x 32 KiB) no longer share a
    buffer and its ffn matrices and head ([512, 128] fp16 = 128 KiB) are split: more
    dispatches, one submission, the same logits (against the whole model in the dense
    layout, which a split ffn value projection keeps)."""
    small = open_model(TINY, max_binding=65536)
    monkeypatch.setenv("RWKV_GPU_NO_SPARSE_FFN", "1")
    whole = open_model(TINY)
    a, b = small.new_state(), whole.new_state()
    np.testing.assert_array_equal(small.forward([1, 2, 3], a), whole.forward([1, 2, 3], b))
    layers = small.config["n_layer"]
    # Per layer: r, k and v (3 x 32 KiB) in buffers of their own, apart from each other
    # and from the low-rank first stages (+3); ffn key and value in two chunks each
    # (+2). The second stages (36 KiB) still share one buffer: wkv7 computes them. Head +1.
    assert stats(small) == (1, stats(whole)[1] + 5 * layers + 1, 1)


def test_scratch_does_not_grow_with_the_prompt():
    """A prefill of 512 tokens that wants the last logits holds the same scratch as a
    one-token call (benches/memory.py relies on this)."""
    m = open_model(TINY)
    m.forward([1], m.new_state())
    one = m.memory()["scratch"]
    m.forward(list(range(512)), m.new_state())
    assert m.memory()["scratch"] == one


@pytest.mark.parametrize("options", [{}, {"max_binding": 65536}, {"dtype": "int8", "quant_head": True}], ids=["one-head-chunk", "split-head", "int8-head"])
def test_argmax_on_the_device_matches_the_logits(options):
    """Greedy decoding on the device picks numpy.argmax of the logits the same model
    computes, step after step, also when the head is split into row chunks."""
    m = open_model(TINY, **options)
    a, b = m.new_state(), m.new_state()
    token = 7
    for _ in range(6):
        logits = m.forward([token], a)
        chosen = m.forward_argmax([token], b)
        assert chosen == int(np.argmax(logits))
        assert stats(m)[2] == 1
        token = chosen
    np.testing.assert_array_equal(a.to_numpy()["wkv"], b.to_numpy()["wkv"])


def test_profiling_times_every_dispatch():
    """With profiling on, each dispatch of the call is timed under its kernel's name;
    off, nothing is recorded (and the results are the same either way)."""
    m = open_model(TINY, dtype="nf4")
    plain = m.forward([3, 4], m.new_state())
    assert m._m.last_profile() == []
    can_time = m._m.set_profiling(True)
    try:
        timed = m.forward([3, 4], m.new_state())
    finally:
        m._m.set_profiling(False)
    np.testing.assert_array_equal(plain, timed)
    profile = m._m.last_profile()
    if not can_time:  # no timestamp queries on this adapter: nothing is claimed
        assert profile == []
        return
    assert len(profile) == stats(m)[1]
    kernels = {name.split(" ")[0] for name, _, _ in profile}
    assert kernels == {"layer_norm", "ln_shift", "matvec", "matvec_sparse", "wkv7"}
    assert any(name.startswith("matvec t2 ") and "f16+nf4" in name for name, _, _ in profile)
    assert all(ns >= 0 for _, ns, _ in profile) and sum(ns for _, ns, _ in profile) > 0


@pytest.mark.parametrize("dtype", ["fp16", "int8", "nf4"])
def test_profile_states_the_bytes_each_product_moves(dtype):
    """Every matrix-product dispatch states the bytes it must move (the profile's GB/s),
    others none. A product moves its weights once however many tokens it serves, and its
    activations per token, so two prefills of T and 2T tokens (no head; past the sizes
    where the WKV kernel computes the low-rank second stages itself) tell them apart:
    the weights part, 2 x bytes(T) - bytes(2T), is exactly every layer matrix the model
    holds, as model.memory() counts them, but block 0's v1 and v2 (loaded, fp16, and
    unused: block 0 has no value residual)."""
    m = open_model(TINY, dtype=dtype)
    if not m._m.set_profiling(True):
        m._m.set_profiling(False)
        pytest.skip("the adapter has no timestamp queries: nothing is profiled")
    try:
        moved = []
        for t in (20, 40):
            m.prefill(list(range(1, t + 1)), m.new_state())
            profile = m._m.last_profile()
            assert all((b > 0) == name.startswith("matmul") for name, _, b in profile)
            moved.append(sum(b for _, _, b in profile))
    finally:
        m._m.set_profiling(False)
    mem, cfg = m.memory(), m.config
    unused = 2 * (2 * cfg["n_embd"] * cfg["lora_widths"][2])
    assert 2 * moved[0] - moved[1] == sum(mem[k] for k in ("weights_fp16", "weights_int8", "weights_nf4")) - unused


@pytest.mark.parametrize("chunk", [None, "512", "64"])
def test_scratch_bytes_follow_the_plan(monkeypatch, chunk):
    """Scratch for one chunk of T tokens, exactly: the residual, the mixes, r/k/v with the
    low-rank hidden values, and v_first; one buffer for emb/att/norm and one for lora/ffn
    (never alive at the same time); the sequence table, argmax results and draws; one token's
    logits and its read-back buffer. T: the device's chunk (256 tokens on CPU devices, 512
    on GPUs; RWKV_GPU_CHUNK_TOKENS sets it), fewer where a binding cannot hold them."""
    if chunk:
        monkeypatch.setenv("RWKV_GPU_CHUNK_TOKENS", chunk)
    m = open_model(TINY)
    m.forward([1], m.new_state())
    cfg = m.config
    c, f, v = cfg["n_embd"], cfg["ffn_size"], cfg["vocab_size"]
    dsum = sum(cfg["lora_widths"])
    widest = max(6 * c, f, 3 * c + dsum)
    device_chunk = int(chunk) if chunk else (256 if cfg["device_type"] == "cpu" else 512)
    t = min(device_chunk, cfg["max_binding"] // (4 * widest))
    assert cfg["chunk_tokens"] == t
    floats = t * c * (1 + 1 + 6 + 3 + 1) + t * dsum + t * max(4 * c, f)
    assert m.memory()["scratch"] == 4 * floats + TABLES + 2 * 4 * v


def test_deepembed_decode_step_counts():
    """A DeepEmbed layer adds two dispatches to a decode step: the s_emb_x merge of its
    table rows (recorded after ln0, while x holds the normalised embedding) and the
    scaling kernel; s1 rides in the ffn key's dispatch."""
    model = open_model(DATA / "deepembed-rwkv7a" / "model.safetensors")
    layers = model.config["n_layer"]
    model.forward([5], model.new_state())
    submissions, dispatches, readbacks = stats(model)
    assert (submissions, readbacks) == (1, 1)
    assert dispatches == (DECODE_PER_LAYER + 2) * layers + 3


def test_deepembed_scratch_adds_each_layers_table_rows():
    """DeepEmbed adds its (L, T, r^2) table rows and, in the lora / ffn buffer, the (T, r)
    modulation inputs after the (T, F) activations."""
    m = open_model(DATA / "deepembed-rwkv7a" / "model.safetensors")
    m.forward([1], m.new_state())
    cfg = m.config
    c, f, v, n_layer, r = cfg["n_embd"], cfg["ffn_size"], cfg["vocab_size"], cfg["n_layer"], cfg["deep_embed_rank"]
    dsum = sum(cfg["lora_widths"])
    widest = max(6 * c, f + r, 3 * c + dsum, n_layer * r * r)
    t = min(256, cfg["max_binding"] // (4 * widest))
    floats = t * c * (1 + 1 + 6 + 3 + 1) + t * dsum + t * max(4 * c, f + r) + t * n_layer * r * r
    assert m.memory()["scratch"] == 4 * floats + TABLES + 2 * 4 * v
