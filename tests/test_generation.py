"""Text generation: the sampler against its NumPy transcription, seeded reproducibility,
stop strings across tokens, streaming, Chat, StateCache, Ctrl-C, and the CLIs.

Text tests use tests/data/trained-bytes (a trained byte-level model: one token per byte,
so every multi-character string spans several tokens)."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, open_model
from rwkv_gpu.generation import StopMatcher
from support import sampling_reference as ref

BYTES_MODEL = DATA / "trained-bytes" / "model.safetensors"
PROMPT = "import numpy as np\n\ndef "
# States that went through the same tokens along different call sequences (prefill
# chunks vs single steps) differ only by f32 rounding: measured up to ~2e-6 here.
STATE_TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return open_model(BYTES_MODEL)


def state_after(model, tokens):
    s = model.new_state()
    model.prefill(tokens, s)
    return s.to_numpy()


def assert_states_close(a, b, tol=STATE_TOL):
    for name in ("att_shift", "wkv", "ffn_shift"):
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=tol, err_msg=name)


# ---- the sampler against sampling_reference (like_rust: the documented choices) ----

@pytest.mark.parametrize("vocab", [1000, 65536])
def test_sampler_distribution_matches_reference(vocab):
    rng = np.random.default_rng(vocab)
    for scale in (0.5, 3.0, 10.0):
        logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
        for temperature, top_p, top_k in [(1.0, 0.3, 0), (0.7, 0.85, 0), (1.3, 1.0, 40), (1.0, 0.95, 5), (0.0, 0.3, 0)]:
            opts = rwkv_gpu.Sampling(temperature=temperature, top_p=top_p, top_k=top_k, banned_tokens=(), seed=1)
            got = rwkv_gpu.Sampler(vocab, opts).probabilities(logits).astype(np.float64)
            want = ref.official_probs(logits, temperature, top_p, top_k, like_rust=True)
            case = (scale, temperature, top_p, top_k)
            assert np.array_equal(got > 0, want > 0), case
            # f32 probabilities against the f64 reference: 1e-6 of the largest.
            assert np.max(np.abs(got - want)) <= 1e-6 * want.max(), case


def test_sampler_penalties_match_reference_over_a_sequence():
    """The same draws recorded by both: identical penalised logits after every step."""
    vocab = 300
    presence, frequency, decay = (float(np.float32(x)) for x in (0.4, 0.3, 0.9))
    opts = rwkv_gpu.Sampling(presence_penalty=presence, frequency_penalty=frequency, penalty_decay=decay,
                             banned_tokens=(0, 7), logit_bias={5: -2.5, 9: 1.25}, seed=3)
    sampler = rwkv_gpu.Sampler(vocab, opts)
    oracle = ref.Penalties(presence, frequency, decay, banned=(0, 7), bias=[(5, -2.5), (9, 1.25)])
    rng = np.random.default_rng(0)
    texts = {t: (b" " if t % 5 == 0 else b"7" if t % 7 == 0 else bytes([65 + t % 26]) * (1 + t % 3)) for t in range(vocab)}
    for _ in range(60):
        logits = rng.standard_normal(vocab).astype(np.float32)
        got = sampler.apply_penalties(logits)
        want = oracle.apply(logits)
        assert np.array_equal(got, want)
        token = int(rng.integers(1, 40))  # a small range, so tokens repeat
        sampler.record(token, texts[token])
        oracle.record(token, texts[token])
    got_counts = sampler.counts()
    assert set(got_counts) == set(oracle.counts)
    for t, c in oracle.counts.items():
        assert got_counts[t] == pytest.approx(c, rel=1e-12), t


def test_sampler_draws_are_seeded():
    logits = np.random.default_rng(1).standard_normal(5000).astype(np.float32)

    def draws(seed):
        sampler = rwkv_gpu.Sampler(5000, rwkv_gpu.Sampling(top_p=0.9, seed=seed))
        return [sampler.sample(logits) for _ in range(50)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_bad_sampling_options_raise_before_anything_runs(model):
    state = model.new_state()
    before = state.to_numpy()
    for bad in ({"top_p": 1.5}, {"temperature": -1.0}, {"penalty_decay": 2.0}, {"banned_tokens": [300]}):
        with pytest.raises(rwkv_gpu.RwkvError, match=next(iter(bad)).split("_tokens")[0]):
            model.generate(PROMPT, state=state, **bad)
    with pytest.raises(TypeError, match="tempreature"):
        model.complete(PROMPT, state=state, tempreature=0.5)
    with pytest.raises(rwkv_gpu.ShapeError):
        model.generate("", state=state)
    with pytest.raises(rwkv_gpu.RwkvError, match="max_tokens"):
        model.generate(PROMPT, state=state, max_tokens=0)
    assert_states_close(state.to_numpy(), before, tol=0)


# ---- generation ----

def test_seeded_generation_repeats(model):
    opts = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    a = model.complete(PROMPT, **opts)
    b = model.complete(PROMPT, **opts)
    assert a.tokens == b.tokens and a.text == b.text
    c = model.complete(PROMPT, **{**opts, "seed": 99})
    assert c.tokens != a.tokens
    assert a.prompt_tokens == len(PROMPT.encode()) and a.completion_tokens == 12 and a.finish_reason == "length"


def test_state_holds_prompt_and_every_drawn_token(model):
    state = model.new_state()
    result = model.complete(PROMPT, state=state, max_tokens=6, temperature=0.0)
    assert result.finish_reason == "length" and len(result.tokens) == 6
    assert_states_close(state.to_numpy(), state_after(model, list(PROMPT.encode()) + result.tokens))


def test_stop_string_across_tokens_ends_text_and_stays_in_state(model):
    free = model.complete(PROMPT, max_tokens=24, temperature=0.0)
    text = free.text
    # A 3-character stop string starting a few characters in: it spans three byte tokens.
    start = next(i for i in range(3, len(text) - 3) if text.find(text[i:i + 3]) == i)
    stop = text[start:start + 3]
    state = model.new_state()
    pieces = list(model.generate(PROMPT, state=state, max_tokens=24, temperature=0.0, stop=["zzzz", stop]))
    assert "".join(pieces) == text[:start]
    assert all(stop not in p for p in pieces)
    # The state went through the stop string's last token, not one token more.
    fed = list(PROMPT.encode()) + free.tokens[:start + 3]
    assert_states_close(state.to_numpy(), state_after(model, fed))
    result = model.complete(PROMPT, max_tokens=24, temperature=0.0, stop=stop)
    assert result.finish_reason == "stop" and result.text == text[:start] and result.completion_tokens == start + 3


def test_stop_token_is_neither_emitted_nor_fed(model):
    free = model.complete(PROMPT, max_tokens=8, temperature=0.0)
    stop_token = free.tokens[3]
    first = free.tokens.index(stop_token)
    state = model.new_state()
    result = model.complete(PROMPT, state=state, max_tokens=8, temperature=0.0, stop_tokens=[stop_token])
    assert result.finish_reason == "stop" and result.tokens == free.tokens[:first]
    assert_states_close(state.to_numpy(), state_after(model, list(PROMPT.encode()) + free.tokens[:first]))


def test_stop_matcher_holds_back_only_possible_starts():
    m = StopMatcher(["\n\n", "abc"])
    assert m.push("Hel") == ("Hel", False)
    assert m.push("lo\n") == ("lo", False)  # "\n" may start "\n\n"
    assert m.push("x") == ("\nx", False)
    assert m.push("ab") == ("", False)
    assert m.push("d") == ("abd", False)
    assert m.push("a") == ("", False)
    assert m.push("bc tail") == ("", True)
    m = StopMatcher(["END"])
    assert m.push("the E") == ("the ", False)
    assert m.flush() == "E"


def test_streamed_pieces_are_the_decoded_text(model):
    """Hot sampling on a byte model draws invalid UTF-8 too: the pieces are still the
    errors='replace' decoding of the tokens, never half a character."""
    run_opts = dict(max_tokens=24, temperature=3.0, top_p=1.0, banned_tokens=(), seed=5)
    pieces = list(model.generate(PROMPT, **run_opts))
    result = model.complete(PROMPT, **run_opts)
    assert "".join(pieces) == bytes(result.tokens).decode("utf-8", errors="replace")
    assert any(t >= 0x80 for t in result.tokens), "the draw should include non-ASCII bytes"


def test_emoji_bytes_stream_as_one_character():
    world = rwkv_gpu.Tokenizer.world()
    world_byte_ids = {world.token_bytes(i): i for i in range(1, 257)}
    emoji = "😀".encode()
    for tok, ids in ((rwkv_gpu.Tokenizer.byte_level(), list(emoji)), (world, [world_byte_ids[bytes([b])] for b in emoji])):
        d = tok.stream_decoder()
        assert [d.push(i) for i in ids] == ["", "", "", "😀"]
        assert d.finish() == ""


def test_breaking_out_keeps_the_state_consistent(model):
    state = model.new_state()
    stream = model.generate(PROMPT, state=state, max_tokens=50, temperature=0.0)
    got = [next(stream) for _ in range(3)]
    stream.close()
    # Suspended at the third piece's yield: the prompt and three tokens were drawn (the
    # third still pending); closing feeds it.
    full = model.complete(PROMPT, max_tokens=3, temperature=0.0)
    assert "".join(got) == full.text[:3]
    assert_states_close(state.to_numpy(), state_after(model, list(PROMPT.encode()) + full.tokens))


def test_ctrl_c_stops_between_tokens(model):
    """KeyboardInterrupt from another thread (as Ctrl-C would) ends the loop; the state
    then holds exactly the tokens the run reports as fed."""
    import _thread
    import signal

    # A process started in the background of a shell inherits SIGINT ignored, and then
    # interrupt_main does nothing: the test needs Python's own handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    state = model.new_state()
    run = model._run(PROMPT, state, 10_000, rwkv_gpu.Sampling(temperature=0.0), (), (0,), None)
    pieces = []
    # Started at the first token, so that the interrupt comes between tokens however long
    # the prompt takes on this device (the prompt's own case is test_errors.py).
    timer = threading.Timer(0.5, _thread.interrupt_main)
    try:
        with pytest.raises(KeyboardInterrupt):
            for piece in run:
                pieces.append(piece)
                if len(pieces) == 1:
                    timer.start()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    fed = run.fed_tokens()
    assert len(PROMPT.encode()) < len(fed) < len(PROMPT.encode()) + 10_000
    assert fed[:len(PROMPT.encode())] == list(PROMPT.encode())
    assert_states_close(state.to_numpy(), state_after(model, fed))
    model.complete("x", state=state, max_tokens=1)  # still usable


# ---- Chat and StateCache ----

def test_chat_turns_equal_one_forward_over_the_transcript(model):
    chat = rwkv_gpu.Chat(model, system="Answer in Python.", max_tokens=10, temperature=0.0)
    replies = [chat.ask(q) for q in ("print a list", "  now\n\n\nsort it  ", "thanks")]
    transcript = bytes(chat.tokens).decode("utf-8", errors="replace")
    assert transcript.startswith("System: Answer in Python.\n\nUser: print a list\n\nAssistant:")
    assert "User: now\nsort it\n\nAssistant:" in transcript  # blank lines collapsed
    assert [h[1] for h in chat.history] == replies
    probe = [ord("\n")]
    got = model.forward(probe, chat.state.clone())
    whole = model.new_state()
    model.prefill(chat.tokens, whole)
    want = model.forward(probe, whole)
    assert np.max(np.abs(got - want)) < 1e-3


def test_a_turn_refused_before_it_runs_keeps_the_system_prompt(model):
    """A bad sampling option fails the first send before anything is fed: the chat is as
    it was, and the next send still begins with the system prompt."""
    chat = rwkv_gpu.Chat(model, system="Answer in Python.", max_tokens=3, temprature=0.0)
    with pytest.raises(TypeError, match="temprature"):
        chat.ask("hi")
    assert chat.tokens == [] and chat.history == []
    chat.sampling = {"temperature": 0.0}
    chat.ask("hi")
    assert bytes(chat.tokens).startswith(b"System: Answer in Python.\n\nUser: hi\n\nAssistant:")


def test_state_cache_feeds_only_the_new_part(model):
    document = "import os\nimport sys\n\nclass Config:\n    "
    cache = rwkv_gpu.StateCache(max_entries=2)
    opts = dict(max_tokens=5, temperature=0.0)
    # Each generation remembers the state after all of its prompt but the last token.
    first = model.complete(document + "def a", cache=cache, **opts)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    cache.prefill(model, document)  # nothing cached is a prefix of it: fed and stored
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
    second = model.complete(document + "def b", cache=cache, **opts)
    assert cache.hits == 1 and cache.tokens_saved == len(document) + 4  # all of "...def "
    third = model.complete(document + "x = 1", cache=cache, **opts)
    assert cache.hits == 2 and cache.tokens_saved == 2 * len(document) + 4
    assert len(cache) == 2  # max_entries: the least recently used entry went
    for prompt, got in ((document + "def a", first), (document + "def b", second), (document + "x = 1", third)):
        assert got.tokens == model.complete(prompt, **opts).tokens


def test_initial_state_is_where_generation_starts(tmp_path):
    m = open_model(BYTES_MODEL)
    s = m.new_state()
    m.prefill(list(b"# a comment about lists\n"), s)
    s.save(tmp_path / "start.st")
    with_initial = open_model(BYTES_MODEL, initial_state=tmp_path / "start.st")
    assert_states_close(with_initial.new_state().to_numpy(), s.to_numpy(), tol=0)
    a = with_initial.complete(PROMPT, max_tokens=6, temperature=0.0)
    b = m.complete(PROMPT, state=s.clone(), max_tokens=6, temperature=0.0)
    assert a.tokens == b.tokens
    with_initial.initial_state = None
    assert not with_initial.new_state().to_numpy()["wkv"].any()


# ---- command line ----

def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, timeout=600)


def test_generate_cli_streams_a_seeded_continuation():
    out = run_cli("rwkv_gpu.generate", "--model", str(BYTES_MODEL), "-n", "6", "--seed", "3", "--top-p", "0.9", PROMPT)
    assert out.returncode == 0, out.stderr
    m = open_model(BYTES_MODEL)
    want = m.complete(PROMPT, max_tokens=6, seed=3, top_p=0.9).text
    assert out.stdout == PROMPT + want + "\n"


def test_chat_cli_answers_and_quits():
    out = run_cli("rwkv_gpu.chat", "--model", str(BYTES_MODEL), "-n", "4", "--temperature", "0", stdin="hello\n/quit\n")
    assert out.returncode == 0, out.stderr
    m = open_model(BYTES_MODEL)
    reply = rwkv_gpu.Chat(m, max_tokens=4, temperature=0.0).ask("hello")
    assert f"Assistant: {reply}\n" in out.stdout


# ---- complete_batch: several generations stepped together ----

PROMPTS = [PROMPT, "class Model:\n    def ", "x = [i for"]


def test_batch_completions_equal_one_at_a_time(model):
    """Greedy and seeded draws give each prompt the completion it gets alone (sequence i
    drawing with seed + i); each state holds its prompt and drawn tokens."""
    states = model.new_states(3)
    greedy = model.complete_batch(PROMPTS, states=states, max_tokens=10, temperature=0.0)
    for prompt, got, state in zip(PROMPTS, greedy, states):
        alone = model.complete(prompt, max_tokens=10, temperature=0.0)
        assert (got.text, got.tokens, got.finish_reason) == (alone.text, alone.tokens, "length")
        assert got.prompt_tokens == len(prompt.encode())
        assert_states_close(state.to_numpy(), state_after(model, list(prompt.encode()) + got.tokens))
    seeded = model.complete_batch([PROMPT, PROMPT], max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    assert seeded[0].tokens == model.complete(PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234).tokens
    assert seeded[1].tokens == model.complete(PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=1235).tokens
    assert seeded[0].tokens != seeded[1].tokens


def test_batch_draws_at_full_vocabulary_equal_one_at_a_time():
    """With a 65536-token vocabulary a step's draws run on several threads (one per core,
    Rust `draw_threads`); each sequence still gets exactly the tokens it draws alone with
    seed + i, under penalties that grow with its own history."""
    wide = rwkv_gpu.Model.random(1, 64, vocab_size=65536, seed=5)
    prompts = [[1, 2, 3], [40000], [7, 7], [65535, 9]]
    options = dict(max_tokens=6, temperature=1.0, top_p=0.95, presence_penalty=0.5, frequency_penalty=0.5, stop_tokens=[])
    together = wide.complete_batch(prompts, seed=77, **options)
    for i, (prompt, got) in enumerate(zip(prompts, together)):
        assert got.tokens == wide.complete(prompt, seed=77 + i, **options).tokens, f"sequence {i}"
    assert len({tuple(c.tokens) for c in together}) == len(prompts)


def test_batch_stops_each_sequence_on_its_own(model):
    """A stop token ends the sequence that draws it (not emitted, not fed) while the
    others go on to max_tokens; a stop string ends its sequence with the string fed."""
    free = [model.complete(p, max_tokens=8, temperature=0.0) for p in PROMPTS]
    # A token the first completion draws after a few others and the third never does.
    stop_token = next(t for t in free[0].tokens[2:] if t not in free[2].tokens)
    states = model.new_states(3)
    got = model.complete_batch(PROMPTS, states=states, max_tokens=8, temperature=0.0, stop_tokens=[stop_token])
    first = free[0].tokens.index(stop_token)
    assert got[0].finish_reason == "stop" and got[0].tokens == free[0].tokens[:first]
    assert got[2].finish_reason == "length" and got[2].tokens == free[2].tokens
    for i in (0, 2):
        assert_states_close(states[i].to_numpy(), state_after(model, list(PROMPTS[i].encode()) + got[i].tokens))
    stop = free[1].text[2:4]
    states = model.new_states(3)
    got = model.complete_batch(PROMPTS, states=states, max_tokens=8, temperature=0.0, stop=stop)
    start = free[1].text.find(stop)
    assert got[1].finish_reason == "stop" and got[1].text == free[1].text[:start]
    fed = list(PROMPTS[1].encode()) + free[1].tokens[:start + 2]
    assert_states_close(states[1].to_numpy(), state_after(model, fed))


def test_bad_batch_generation_calls_raise(model):
    with pytest.raises(rwkv_gpu.ShapeError, match="one state per prompt"):
        model.complete_batch(PROMPTS, states=model.new_states(2))
    with pytest.raises(rwkv_gpu.ShapeError, match="at least one prompt"):
        model.complete_batch([])
    with pytest.raises(rwkv_gpu.ShapeError, match="list of prompts"):
        model.complete_batch(PROMPT)
    with pytest.raises(rwkv_gpu.RwkvError, match="max_tokens"):
        model.complete_batch(PROMPTS, max_tokens=0)
    with pytest.raises(TypeError, match="cache"):
        model.complete_batch(PROMPTS, cache=rwkv_gpu.StateCache())
    with pytest.raises(TypeError, match="cache"):
        model.generate_batch(PROMPTS, cache=rwkv_gpu.StateCache())
    with pytest.raises(TypeError, match="unknown generation option"):
        model.complete_batch(PROMPTS, tempreature=0.5)


def test_generate_batch_streams_each_sequence_and_stops_cleanly(model):
    """Pieces tagged with their prompt's index join to complete_batch's texts and arrive
    interleaved, step by step; leaving after the first piece feeds exactly what was handed
    out: sequence 0's first token; sequences 1 and 2 drew theirs in the same step, but the
    caller never got them, so their states hold only their prompts."""
    want = model.complete_batch(PROMPTS, max_tokens=6, temperature=0.0)
    pieces = list(model.generate_batch(PROMPTS, max_tokens=6, temperature=0.0))
    assert ["".join(p for i, p in pieces if i == k) for k in range(3)] == [c.text for c in want]
    assert [i for i, _ in pieces[:3]] == [0, 1, 2]  # one piece of each per step (bytes model)
    states = model.new_states(3)
    stream = model.generate_batch(PROMPTS, states=states, max_tokens=6, temperature=0.0)
    assert next(stream) == pieces[0]
    stream.close()
    for k, (prompt, state, c) in enumerate(zip(PROMPTS, states, want)):
        given = c.tokens[:1] if k == 0 else []
        assert_states_close(state.to_numpy(), state_after(model, list(prompt.encode()) + given))


def test_sampling_defaults_have_one_source():
    """The core's defaults (the official chat demo's) are Sampling's, and every entry point
    that shows them (Model.generate's signature, the CLIs' flags) shows the same."""
    import argparse
    import inspect

    from rwkv_gpu._cli import add_sampling_args

    s = rwkv_gpu.Sampling()
    assert (s.temperature, s.top_p, s.top_k, s.presence_penalty, s.frequency_penalty, s.penalty_decay, s.banned_tokens) == (
        1.0, 0.3, 0, 0.5, 0.5, 0.996, (0,))
    core = rwkv_gpu._core.sampling_defaults()
    assert all(abs(getattr(s, k) - core[k]) < 1e-7 for k in ("temperature", "top_p", "presence_penalty", "penalty_decay"))
    params = inspect.signature(rwkv_gpu.Model.generate).parameters
    for name in ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "penalty_decay", "banned_tokens"):
        assert params[name].default == getattr(s, name), name
    ap = argparse.ArgumentParser()
    add_sampling_args(ap, max_tokens=8)
    args = ap.parse_args([])
    assert (args.temperature, args.top_p, args.top_k, args.penalty_decay) == (s.temperature, s.top_p, s.top_k, s.penalty_decay)
