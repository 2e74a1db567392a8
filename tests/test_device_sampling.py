"""Sampling on the device (shaders/sample.wgsl) against the NumPy reference of the
official sampler (tests/support/sampling_reference.py, `like_rust=True`: the choices
src/sampler.rs makes), and generation drawing on the device against drawing on the host.

The kernel sums in f32 where the reference (and the host sampler) sum in float64, so a
draw may differ only where u lies within rounding of the edge between two tokens'
intervals of the cumulative distribution. EDGE = 2e-5 of the total is that allowance:
an f32 tree sum of 70000 terms is off by at most ~17 roundings of 6e-8 relative, 1e-6,
and u itself is rounded to f32 (6e-8); 2e-5 leaves 20x headroom, and a wrong cutoff,
top-k, temperature or penalty moves the intervals by far more (one token of a
1000-token distribution is ~1e-3 wide).
"""
import os
import sys
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import sampling_reference as ref  # noqa: E402

pytest.importorskip("wgpu")
from test_kernels import run_kernel  # noqa: E402

EDGE = 2e-5
NONE = 0xFFFFFFFF


def draw_rows(logits, draws, row0=0):
    """Runs the kernel over `logits` (rows, V), one workgroup per row; `draws` are dicts
    of the Draw fields (entries given as a list of (token, bias, penalty, banned)). With
    `row0`, the dispatch's rows are rows row0.. of the draws table and of `best` (the
    rows before them: draws that must not run)."""
    rows, vocab = logits.shape
    draws = [dict(u=0.5, temperature=0.0, fallback=7)] * row0 + list(draws)
    table = np.zeros((row0 + rows, 8), np.uint32)
    flat = []
    for r, d in enumerate(draws):
        mine = d.get("entries", [])
        table[r] = [
            np.float32(d.get("u", 0.5)).view(np.uint32),
            np.float32(d.get("temperature", 1.0)).view(np.uint32),
            np.float32(d.get("top_p", 1.0)).view(np.uint32),
            d.get("top_k", 0),
            d.get("fallback", 0),
            len(flat),
            len(mine),
            d.get("skip", 0),
        ]
        for token, bias, penalty, banned in mine:
            bias = -np.inf if banned else bias
            flat.append([token, np.float32(bias).view(np.uint32), np.float32(penalty).view(np.uint32), int(banned)])
    packed = np.array(flat or [[0, 0, 0, 0]], np.uint32)
    best = np.full((row0 + rows, 2), 0xDEADBEEF, np.uint32)
    _, _, _, best = run_kernel("sample", [], "sample", [vocab, row0], [logits, table, packed, best], (1, rows, 1))
    assert np.all(best[:row0] == 0xDEADBEEF), "rows before row0 are not this dispatch's"
    return best[row0:, 0]


def assert_draws(got, logits, us, **options):
    """`got[i]` was drawn with `us[i]` from `logits` (one row, the same for every draw):
    the reference's token wherever u is farther than EDGE from an edge of the reference's
    cumulative distribution, and a drawable token anywhere."""
    options = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **options}  # draw_rows' defaults
    probs = ref.official_probs(logits, like_rust=True, **options)
    cdf = np.cumsum(probs)
    edges = cdf[probs > 0]
    far = 0
    for g, u in zip(got, us):
        want = ref.draw(probs, u)
        if float(np.min(np.abs(edges - u))) > EDGE:
            far += 1
            assert g == want, f"u {u}: drew {g} (p {probs[g]:.3g}), the reference {want} (p {probs[want]:.3g}); {options}"
        else:
            assert probs[g] > 0, f"u {u} at an edge: drew {g}, which the reference cannot draw"
    assert far >= len(us) // 2, "most draws must be far from an edge to test anything"


@pytest.mark.parametrize("vocab", [1000, 70001])  # 70001: not a multiple of anything, > 65536
@pytest.mark.parametrize("temperature, top_p, top_k", [
    (1.0, 1.0, 0),    # plain
    (1.0, 0.85, 0),   # the official default cut
    (0.7, 0.3, 0),    # the chat demo's cut, sharper
    (1.3, 0.9, 40),   # top-k after top-p, flatter
    (1.0, 1.0, 5),    # top-k alone
    (0.0, 0.85, 0),   # greedy
])
def test_draws_follow_the_reference(vocab, temperature, top_p, top_k):
    rng = np.random.default_rng(vocab + int(100 * temperature) + int(100 * top_p) + top_k)
    rows = 24
    # Two distributions on alternate rows, each drawn with many u: the inverse CDF at
    # many points, and a row that read its neighbour's logits would draw from the other.
    bases = [(rng.standard_normal(vocab) * scale).astype(np.float32) for scale in (2.5, 3.5)]
    logits = np.stack([bases[r % 2] for r in range(rows)])
    us = rng.random(rows)
    draws = [dict(u=u, temperature=temperature, top_p=top_p, top_k=top_k) for u in us]
    got = draw_rows(logits, draws, row0=3)
    for parity, base in enumerate(bases):
        assert_draws(got[parity::2], base, us[parity::2], temperature=temperature, top_p=top_p, top_k=top_k)


def test_every_interval_of_a_small_distribution():
    """u swept over [0, 1): each token is drawn exactly on its interval of the cumulative
    distribution, in id order."""
    weights = np.array([0.05, 0.3, 0.0, 0.15, 0.25, 0.25])
    logits = np.log(np.maximum(weights, 1e-30)).astype(np.float32)
    logits[2] = -np.inf
    us = (np.arange(200) + 0.5) / 200
    got = draw_rows(np.tile(logits, (200, 1)), [dict(u=u) for u in us])
    assert_draws(got, logits, us)
    assert sorted(set(got.tolist())) == [0, 1, 3, 4, 5]


def test_ties_at_the_kth_place_keep_the_lowest_ids():
    # Eight tokens tie at the top; top-k 3 keeps ids 10, 20, 30 (the lowest), each a third.
    logits = np.full(500, -5.0, np.float32)
    logits[[10, 20, 30, 40, 50, 60, 70, 80]] = 4.0
    us = np.array([0.1, 0.4, 0.8, 0.99])
    got = draw_rows(np.tile(logits, (4, 1)), [dict(u=u, top_k=3) for u in us])
    assert got.tolist() == [10, 20, 30, 30]


def test_ties_at_the_top_p_cutoff_survive():
    # 0.4, 0.2, 0.2, 0.2 at top_p 0.5: the mass reaches 0.5 at the first 0.2, so every
    # 0.2 stays (the host's and the official's rule); at 0.4 only the 0.4 stays.
    logits = np.log(np.array([0.2, 0.4, 0.2, 0.2])).astype(np.float32)
    us = (np.arange(40) + 0.5) / 40
    for top_p, drawable in ((0.5, [0, 1, 2, 3]), (0.4, [1])):
        got = draw_rows(np.tile(logits, (40, 1)), [dict(u=u, top_p=top_p) for u in us])
        assert_draws(got, logits, us, top_p=top_p)
        assert sorted(set(got.tolist())) == drawable, top_p


def test_greedy_with_top_k_below_the_tied_maxima_keeps_the_lowest_id():
    logits = np.zeros(300, np.float32)
    logits[[40, 7, 250]] = 3.0
    got = draw_rows(np.tile(logits, (3, 1)), [dict(u=u, temperature=0.0, top_k=1) for u in (0.1, 0.5, 0.9)])
    assert got.tolist() == [7, 7, 7]


def test_nan_among_finite_logits_counts_as_minus_infinity():
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal(900) * 2).astype(np.float32)
    logits[[3, 100, int(np.argmax(logits))]] = np.nan  # the favourite among them
    us = rng.random(16)
    got = draw_rows(np.tile(logits, (16, 1)), [dict(u=u, top_p=0.9) for u in us])
    as_minus_inf = np.where(np.isnan(logits), -np.inf, logits).astype(np.float32)
    assert_draws(got, as_minus_inf, us, top_p=0.9)


def test_greedy_shares_tied_maxima_and_ignores_top_p():
    logits = np.zeros(300, np.float32)
    logits[[7, 250]] = 3.0
    got = draw_rows(np.tile(logits, (2, 1)), [dict(u=0.25, temperature=0.0, top_p=1.0), dict(u=0.75, temperature=0.0)])
    assert got.tolist() == [7, 250]


def test_penalties_bias_and_bans_in_the_hosts_order():
    rng = np.random.default_rng(5)
    vocab, rows = 3000, 16
    base = (rng.standard_normal(vocab) * 2).astype(np.float32)
    top = np.argsort(-base)[:6]
    entries = [
        (int(top[0]), 0.0, 0.0, True),      # the favourite banned
        (int(top[1]), 0.0, 3.5, False),     # penalised
        (int(top[2]), -2.0, 1.25, False),   # biased down and penalised
        (17, 6.0, 0.0, False),              # biased up
    ]
    us = rng.random(rows)
    got = draw_rows(np.tile(base, (rows, 1)), [dict(u=u, top_p=0.85, entries=entries) for u in us])
    penalised = base.copy()
    for token, bias, penalty, banned in entries:
        penalised[token] = -np.inf if banned else (penalised[token] + np.float32(bias)) - np.float32(penalty)
    assert_draws(got, penalised, us, top_p=0.85)
    assert int(top[0]) not in got.tolist()


def test_a_tiny_temperature_draws_the_top():
    """1 / temperature overflows f32 below ~3e-39: the top still weighs 1 (the host's
    float64 power gives the same), every other weight 0."""
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal(500) * 2).astype(np.float32)
    got = draw_rows(np.tile(logits, (3, 1)), [dict(u=u, temperature=1e-39, top_p=1.0) for u in (0.01, 0.5, 0.99)])
    assert got.tolist() == [int(np.argmax(logits))] * 3


def test_rows_read_their_own_options_and_entries():
    """Rows side by side, each with its own options and entries: no row sees another's."""
    rng = np.random.default_rng(6)
    vocab = 2000
    logits = (rng.standard_normal((3, vocab)) * 2).astype(np.float32)
    ban = int(np.argmax(logits[1]))
    draws = [dict(u=0.3, temperature=0.0), dict(u=0.3, temperature=0.0, entries=[(ban, 0.0, 0.0, True)]),
             dict(u=0.9, top_k=1)]
    got = draw_rows(logits, draws)
    second = logits[1].copy()
    second[ban] = -np.inf
    assert got.tolist() == [int(np.argmax(logits[0])), int(np.argmax(second)), int(np.argmax(logits[2]))]


def test_nothing_drawable_gives_the_fallback_and_skipped_rows_stay():
    vocab = 400
    logits = np.full((4, vocab), -np.inf, np.float32)
    logits[0, 5] = np.nan           # NaN counts as -inf
    logits[1, [3, 9]] = np.inf      # +inf logits share all the mass
    logits[2, 11] = 1.0             # the only live token, banned below
    logits[3, 0] = 1.0
    draws = [dict(fallback=1), dict(u=0.75), dict(fallback=2, entries=[(11, 0.0, 0.0, True)]), dict(skip=1)]
    got = draw_rows(logits, draws)
    assert got.tolist() == [1, 9, 2, NONE]  # a skipped row says it drew nothing


# ---- generation drawing on the device, against drawing on the host ----

from conftest import DATA, open_model  # noqa: E402

TRAINED = DATA / "trained-bytes" / "model.safetensors"
TINY = DATA / "tiny-rwkv7" / "model.safetensors"
PROMPT = (DATA / "trained-bytes" / "heldout.txt").read_text()[:160]
# temperature, top_p, top_k, penalties, bias and bans: each option of a draw.
SETTINGS = [
    dict(temperature=1.0, top_p=0.85),
    dict(temperature=0.7, top_p=0.9, top_k=20, presence_penalty=0.3, frequency_penalty=0.2),
    dict(temperature=0),
    dict(temperature=1.2, top_p=1.0, banned_tokens=[101, 32], logit_bias={10: 2.0, 116: -float("inf")}),
]


def models_on(make):
    """The model `make()` opens, opened twice: drawing on the host, and on the device."""
    out = {}
    for place in ("host", "device"):
        os.environ["RWKV_GPU_SAMPLE_ON"] = place
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the software-adapter warning
                out[place] = make()
        finally:
            os.environ.pop("RWKV_GPU_SAMPLE_ON", None)
        assert out[place].config["sample_on"] == place
    return out


def small_binding_model():
    """A random 1 x 64 model with an 8192-token vocabulary under a 64 KiB binding."""
    import rwkv_gpu

    return rwkv_gpu.Model.random(1, 64, vocab_size=8192, max_binding=65536)


def test_the_default_place_is_by_device_type(tiny_model):
    """GPUs draw on the device; CPU drivers on the host, where the draw's passes cost
    more than the host's own (src/gpu/context.rs, sample_on_device_for_device_type)."""
    cpu = tiny_model.config["device_type"] == "cpu"
    assert tiny_model.config["sample_on"] == ("host" if cpu else "device")


@pytest.fixture(scope="module")
def trained():
    return models_on(lambda: open_model(TRAINED))


def decode_dispatches(model):
    return model._m.last_stats()[1] - model._m.last_stats()[3]  # outside the layers: ln0 + head (+ sample)


def test_seeded_generation_draws_the_same_text_on_device_and_host(trained):
    """Same seed, same tokens: both sides take the same random number per draw and draw
    from the same distribution. A run may part only where a number falls within EDGE of
    a boundary (~4e-5 a draw: ~0.015 expected differences over these 320 draws), so at
    least 7 of the 8 runs must match exactly; a wrong option changes most of them."""
    same, runs = 0, 0
    for settings in SETTINGS:
        for seed in range(2):
            host = trained["host"].complete(PROMPT, max_tokens=40, seed=seed, **settings).text
            device = trained["device"].complete(PROMPT, max_tokens=40, seed=seed, **settings).text
            same += host == device
            runs += 1
    assert same >= runs - 1, f"{runs - same} of {runs} runs differ"


def test_batches_with_prompts_still_reading_draw_the_same(trained):
    """A batch whose sequences are at different points (long and short prompts under a
    prefill budget: rows that draw and rows that skip in one step), each with its own
    seed and penalty history."""
    prompts = [PROMPT, PROMPT[:7], PROMPT[40:140], "x"]
    outs = {}
    for place, model in trained.items():
        outs[place] = [c.text for c in model.complete_batch(prompts, max_tokens=40, seed=11, temperature=0.9, top_p=0.9)]
    same = sum(a == b for a, b in zip(outs["host"], outs["device"]))
    assert same >= len(prompts) - 1, outs


def test_log_probabilities_keep_the_draw_on_the_host(trained):
    """A sequence that wants log-probabilities needs the logits: that step draws on the
    host, with the same number as the device would have taken."""
    import rwkv_gpu

    model = trained["device"]
    tokens = {}
    for top in (None, 3):
        tokens[top], _ = step_tokens(model, list(PROMPT.encode()), 30, rwkv_gpu.Sampling(seed=5, temperature=0.8), top)
        # ln0, ln_out and the head's one chunk, and the sampler when the device drew.
        assert decode_dispatches(model) == 3 + (top is None)
    assert tokens[None] == tokens[3]


def step_tokens(model, prompt, steps, sampling, top_logprobs=None):
    """Steps one sequence through `model._m.batch()`, taking every drawn token. Returns
    the tokens and the device objects created so far after each step."""
    import rwkv_gpu

    batch = model._m.batch()
    sampler = rwkv_gpu.Sampler(model.config["vocab_size"], sampling)
    seq = batch.add(model.new_state()._core, sampler._core, prompt, [], top_logprobs)
    got, created = [], []
    for _ in range(steps):
        (event,) = batch.step()
        assert (event[3] is None) == (top_logprobs is None)
        batch.record(seq, event[1], b"x")
        got.append(event[1])
        created.append(model._m.created())
    return got, created


def test_groups_of_rows_over_a_split_head_and_several_pages():
    """`small_binding_model`: its head splits into many row chunks, gathered into whole
    rows two at a time (a row is 32 KiB), and three states fit a page, so seven sequences
    run as three pages' calls with groups of rows at row0 0 and 2. Greedy draws equal the host's; seeded ones too (but for an
    edge: at most one sequence may part)."""
    models = models_on(small_binding_model)
    prompts = [[1 + i, 2 * i + 5, 3] for i in range(7)]
    for options, allowed in ((dict(temperature=0), 0), (dict(seed=3, temperature=1.0, top_p=0.9), 1)):
        outs = {place: [c.tokens for c in m.complete_batch(prompts, max_tokens=6, stop_tokens=(), **options)]
                for place, m in models.items()}
        differ = sum(a != b for a, b in zip(outs["host"], outs["device"]))
        assert differ <= allowed, (options, outs)


@pytest.mark.parametrize("options", [{}, {"max_binding": 65536}], ids=["one-head-chunk", "split-head"])
def test_greedy_tokens_and_no_objects_created_per_step(options):
    """Greedy decoding draws the argmax on either side, whole-row or gathered from the
    head's row chunks; after the first steps a step creates no buffer or bind group."""
    import rwkv_gpu

    models = models_on(lambda: open_model(TINY, **options))
    tokens, outside = {}, {}
    for place, model in models.items():
        tokens[place], created = step_tokens(model, [1, 2, 3], 24, rwkv_gpu.Sampling(temperature=0))
        outside[place] = decode_dispatches(model)
        assert created[2:] == [created[2]] * (len(created) - 2), place
    assert tokens["host"] == tokens["device"]
    # The device drew: one more dispatch (the sampler) beside ln0 and the head's.
    assert outside["device"] == outside["host"] + 1


def test_more_penalty_entries_than_a_binding_holds_draw_on_the_host():
    """Rows of 32 KiB fit a 64 KiB binding, but 5000 biased tokens (80 KB of entries) do
    not: those steps draw on the host, with the same tokens."""
    import rwkv_gpu

    models = models_on(small_binding_model)
    outside, tokens = {}, {}
    for bias_count in (10, 5000):
        sampling = rwkv_gpu.Sampling(temperature=0, logit_bias={t: 0.25 for t in range(bias_count)})
        for place, model in models.items():
            tokens[place], _ = step_tokens(model, [1, 2, 3], 4, sampling)
            outside[place] = decode_dispatches(model)
        assert tokens["host"] == tokens["device"]
        # The device drew (one more dispatch) only while its entries fit.
        assert outside["device"] == outside["host"] + (bias_count == 10), bias_count
