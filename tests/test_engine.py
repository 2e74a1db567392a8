"""The serving Engine: concurrent requests give what each gives alone, requests join and
leave a running batch, long prompts are fed in pieces between decode steps, cancellation,
per-request failures, states in and out, the prefix cache, asyncio, and a clean close.

Uses the trained byte-level model (tests/data/trained-bytes). "Alone" means
`Model.complete` on a fresh state; the Engine batches the same tokens through the same
kernels, and batched and single forwards agree to f32 rounding, which does not flip a
greedy or seeded draw on this model (as tests/test_generation.py's batch tests find)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, open_model
from test_generation import assert_states_close, state_after

BYTES_MODEL = DATA / "trained-bytes" / "model.safetensors"
PROMPTS = ["import numpy as np\n\ndef ", "class Model:\n    def __init__(self", "for i in range(10):\n    ",
           "# Licensed under the Apache License", "x = [", "def main():\n    print(", "while True:\n", "try:\n    import"]
GREEDY = {"temperature": 0.0}
SEEDED = {"temperature": 1.0, "top_p": 0.9, "seed": 77}


@pytest.fixture(scope="module")
def model():
    return open_model(BYTES_MODEL)


def alone(model, prompt, max_tokens, **options):
    return model.complete(prompt, max_tokens=max_tokens, **options)


@pytest.mark.parametrize("options", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_concurrent_requests_equal_each_alone(model, options):
    with rwkv_gpu.Engine(model, max_batch=4) as engine:  # 8 requests: 4 run, 4 wait for slots
        requests = [engine.submit(p, max_tokens=12, **options) for p in PROMPTS]
        got = [r.result(timeout=120) for r in requests]
        stats = engine.stats()
    for prompt, completion in zip(PROMPTS, got):
        want = alone(model, prompt, 12, **options)
        assert (completion.text, completion.tokens, completion.finish_reason) == (want.text, want.tokens, "length")
        assert completion.prompt_tokens == len(prompt.encode())
    assert stats["requests_finished_length"] == 8 and stats["generated_tokens"] == 8 * 12
    # The batch was shared: fewer steps than requests x tokens.
    assert stats["steps"] < 8 * 12 and stats["batch_occupancy_sum"] / stats["steps"] > 2


def test_pieces_stream_from_any_thread(model):
    with rwkv_gpu.Engine(model) as engine:
        results: dict[int, str] = {}

        def client(i):
            results[i] = "".join(engine.submit(PROMPTS[i], max_tokens=10, **GREEDY))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    for i in range(4):
        assert results[i] == alone(model, PROMPTS[i], 10, **GREEDY).text


def test_a_request_joins_a_running_batch_and_leaves_it(model):
    with rwkv_gpu.Engine(model, max_batch=4) as engine:
        first = engine.submit(PROMPTS[0], max_tokens=40, **GREEDY)
        while len(first.tokens) < 5:
            time.sleep(0.01)
        second = engine.submit(PROMPTS[1], max_tokens=5, **GREEDY)
        a, b = first.result(timeout=120), second.result(timeout=120)
        joined_at = 5
        assert len(first.tokens) >= joined_at
    assert a.tokens == alone(model, PROMPTS[0], 40, **GREEDY).tokens
    assert b.tokens == alone(model, PROMPTS[1], 5, **GREEDY).tokens
    # The short one left long before the long one ended.
    assert second.finished_at < first.finished_at


def test_long_prompt_is_fed_in_pieces_while_others_decode(model):
    """With max_prefill_tokens 32, a 600-byte prompt takes ~19 steps to go in; a stream
    already running gets a token at each of them, and both results equal the alone ones."""
    long_prompt = (DATA / "trained-bytes" / "heldout.txt").read_text()[:600]
    with rwkv_gpu.Engine(model, max_batch=4, max_prefill_tokens=32) as engine:
        running = engine.submit(PROMPTS[0], max_tokens=60, **GREEDY)
        while len(running.tokens) < 2:
            time.sleep(0.01)
        before = len(running.tokens)
        late = engine.submit(long_prompt, max_tokens=4, **GREEDY)
        while late.first_token_at is None and not late.done:
            time.sleep(0.005)
        during = len(running.tokens) - before
        assert late.result(timeout=120).tokens == alone(model, long_prompt, 4, **GREEDY).tokens
        assert running.result(timeout=120).tokens == alone(model, PROMPTS[0], 60, **GREEDY).tokens
    assert during >= 600 // 32 - 2, f"the running stream got only {during} tokens while the prompt went in"


def test_cancel_frees_the_slot_and_keeps_what_was_handed_out(model):
    with rwkv_gpu.Engine(model, max_batch=1) as engine:
        first = engine.submit(PROMPTS[0], max_tokens=10_000, return_state=True, **GREEDY)
        waiting = engine.submit(PROMPTS[1], max_tokens=6, **GREEDY)
        while len(first.tokens) < 3:
            time.sleep(0.01)
        assert not waiting.done and waiting.first_token_at is None  # no slot for it yet
        first.cancel()
        assert waiting.result(timeout=60).tokens == alone(model, PROMPTS[1], 6, **GREEDY).tokens
        done = first.result(timeout=10)
    assert first.finish_reason == "cancelled" and 3 <= len(done.tokens) < 10_000
    assert done.text == bytes(done.tokens).decode("utf-8", errors="replace")
    assert_states_close(first.state.to_numpy(), state_after(model, list(PROMPTS[0].encode()) + done.tokens))


def test_cancelling_a_request_still_reading_its_prompt_feeds_no_more_of_it(model):
    """With max_prefill_tokens 32, a 2000-byte prompt takes ~63 steps to go in. Cancelled
    after a few, the request ends without the rest being fed (which held the scheduler,
    every stream with it, for the whole prompt), and the state it was given, which would
    have held part of the prompt, is left as it was; nothing is returned for it."""
    long_prompt = (DATA / "trained-bytes" / "heldout.txt").read_text()[:2000]
    given = model.new_state()
    model.prefill(list(b"# notes\n"), given)
    before = given.to_numpy()
    with rwkv_gpu.Engine(model, max_batch=2, max_prefill_tokens=32) as engine:
        cancelled = engine.submit(long_prompt, max_tokens=4, state=given, **GREEDY)
        returned = engine.submit(long_prompt, max_tokens=4, return_state=True, **GREEDY)
        while engine.stats().get("steps", 0) < 3:
            time.sleep(0.005)
        cancelled.cancel()
        returned.cancel()
        for request in (cancelled, returned):
            assert request.result(timeout=60).tokens == []
            assert request.finish_reason == "cancelled"
        steps = engine.stats()["steps"]
        assert steps < 2000 // 32, f"the prompts went in before the cancel ({steps} steps)"
    after = given.to_numpy()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert returned.state is None


def test_a_failing_request_fails_alone(model):
    with rwkv_gpu.Engine(model, max_batch=4) as engine:
        good = [engine.submit(p, max_tokens=8, **GREEDY) for p in PROMPTS[:2]]
        bad = engine.submit([65, 300, 66], max_tokens=8)  # 300 is past the 256-token vocabulary
        more = engine.submit(PROMPTS[2], max_tokens=8, **GREEDY)
        with pytest.raises(rwkv_gpu.ShapeError, match="token id 300 at position 1"):
            bad.result(timeout=60)
        with pytest.raises(rwkv_gpu.ShapeError):
            list(bad)
        for prompt, request in zip([*PROMPTS[:2], PROMPTS[2]], [*good, more]):
            assert request.result(timeout=60).tokens == alone(model, prompt, 8, **GREEDY).tokens
        assert engine.stats()["requests_failed"] == 1
        # Bad options raise at submit, naming the option.
        with pytest.raises(rwkv_gpu.InvalidOptionError, match="max_tokens"):
            engine.submit("x", max_tokens=0)
        with pytest.raises(rwkv_gpu.InvalidOptionError, match="top_p"):
            engine.submit("x", top_p=2.0)
        with pytest.raises(TypeError, match="unknown generation option"):
            engine.submit("x", tempreature=0.5)


def test_state_in_and_out(model):
    start = model.new_state()
    model.prefill(list(b"# a comment\n"), start)
    before = start.to_numpy()
    expected_state = start.clone()
    expected = model.complete(PROMPTS[0], state=expected_state, max_tokens=10, **GREEDY)
    with rwkv_gpu.Engine(model) as engine:
        request = engine.submit(PROMPTS[0], state=start, max_tokens=10, **GREEDY)
        got = request.result(timeout=60)
    assert got.tokens == expected.tokens and request.state is start
    assert_states_close(start.to_numpy(), expected_state.to_numpy())
    assert not np.allclose(before["wkv"], start.to_numpy()["wkv"])


def test_prefix_cache_feeds_only_the_rest(model):
    system = "# utilities for parsing\nimport re\n\n"
    prompts = [system + "def parse(", system + "class Parser:"]
    with rwkv_gpu.Engine(model, max_batch=2) as engine:
        first = engine.submit(prompts[0], max_tokens=6, cache_points=[len(system)], **GREEDY)
        first.result(timeout=60)
        second = engine.submit(prompts[1], max_tokens=6, cache_points=[len(system)], **GREEDY)
        got = second.result(timeout=60)
        # A continuation of the first conversation starts from its final state.
        follow = prompts[0] + bytes(first.tokens).decode("utf-8", errors="replace") + "\n"
        third = engine.submit(follow, max_tokens=6, **GREEDY)
        third.result(timeout=60)
        stats = engine.stats()
    assert first.cached_tokens == 0 and second.cached_tokens == len(system)
    assert third.cached_tokens == len(prompts[0]) + len(first.tokens)
    assert got.tokens == alone(model, prompts[1], 6, **GREEDY).tokens
    assert third.result().tokens == alone(model, follow, 6, **GREEDY).tokens
    assert stats["prefix_cache_hits"] >= 2 and stats["prompt_tokens_cached"] == second.cached_tokens + third.cached_tokens
    assert 0 < stats["prefix_cache_bytes"] <= 256 << 20


def test_only_the_latest_cache_points_pause_a_prompt(model):
    """A prompt of many messages (a point after each) pauses at its last MAX_CACHE_POINTS
    only: each pause is a step of its own and a cache entry, so a request of thousands of
    tiny messages cannot hold a slot for thousands of steps or flush the cache."""
    from rwkv_gpu.engine import MAX_CACHE_POINTS

    prompt = "x" * 40
    with rwkv_gpu.Engine(model, max_batch=1) as engine:
        request = engine.submit(prompt, max_tokens=2, cache_points=range(1, 40), **GREEDY)
        got = request.result(timeout=60)
        stats = engine.stats()
    assert request.cache_points == list(range(40 - MAX_CACHE_POINTS, 40))
    assert got.tokens == alone(model, prompt, 2, **GREEDY).tokens
    # The states cached: at the points kept (the last is the prompt but its last token),
    # and the final one (for the conversation's next turn).
    assert stats["prefix_cache_entries"] == MAX_CACHE_POINTS + 1, stats


@pytest.mark.parametrize("cache_bytes", [256 << 20, 0], ids=["cache", "no-cache"])
def test_one_prompt_sent_many_times_is_read_once(model, cache_bytes):
    """Requests with the same prompt (n choices, or clients sending one prompt at once)
    wait for the first to read it and start from the state it leaves in the prefix cache:
    one prompt's worth of prefill instead of n, the same draws. Without a cache each reads
    its own."""
    prompt = "".join(PROMPTS) * 2  # some hundreds of tokens: many steps at 32 a step
    seeds = [SEEDED["seed"] + i for i in range(6)]
    with rwkv_gpu.Engine(model, max_batch=4, max_prefill_tokens=32, cache_bytes=cache_bytes) as engine:
        requests = [engine.submit(prompt, max_tokens=5, **dict(SEEDED, seed=s)) for s in seeds]
        got = [r.result(timeout=120) for r in requests]
        stats = engine.stats()
    n, length = len(seeds), len(prompt.encode())
    for seed, completion in zip(seeds, got):
        assert completion.tokens == alone(model, prompt, 5, **dict(SEEDED, seed=seed)).tokens
    if cache_bytes:
        assert [r.cached_tokens for r in requests] == [0] + [length - 1] * (n - 1)
        # Three followed the first (4 slots), starting from its slot's state; the last two,
        # admitted as slots came free, found that state in the prefix cache.
        assert stats["prompt_reads_shared"] == 3 and stats["prefix_cache_hits"] >= 2
        assert stats["prompt_tokens"] - stats["prompt_tokens_cached"] == length + n - 1
    else:
        assert [r.cached_tokens for r in requests] == [0] * n and "prompt_reads_shared" not in stats
    assert stats["queue_length"] == 0 and stats["requests_finished_length"] == n


def test_a_system_prompt_sent_by_many_at_once_is_read_once(model):
    """Prompts that share their start up to a cache point (a system prompt), arriving
    together: the first reads the shared part, the others wait for its state there and
    read only their own rest; each draws as it would alone."""
    system = "# utilities for parsing and printing\nimport re\nimport sys\n\n" * 3
    prompts = [system + p for p in PROMPTS[:4]]
    with rwkv_gpu.Engine(model, max_batch=4, max_prefill_tokens=16) as engine:
        requests = [engine.submit(p, max_tokens=4, cache_points=[len(system)], **GREEDY) for p in prompts]
        got = [r.result(timeout=120) for r in requests]
        stats = engine.stats()
    assert [r.cached_tokens for r in requests] == [0] + [len(system)] * 3
    assert stats["prompt_reads_shared"] == 3
    assert stats["prompt_tokens"] - stats["prompt_tokens_cached"] == sum(map(len, prompts)) - 3 * len(system)
    for prompt, completion in zip(prompts, got):
        assert completion.tokens == alone(model, prompt, 4, **GREEDY).tokens


def test_followers_keep_their_places(model):
    """Followers hold the slots they were admitted to: requests queued after them do not
    take those while the reader reads, so n choices start together."""
    prompt = "".join(PROMPTS) * 2
    with rwkv_gpu.Engine(model, max_batch=4, max_prefill_tokens=32) as engine:
        choices = [engine.submit(prompt, max_tokens=2, **dict(SEEDED, seed=i)) for i in range(4)]
        later = [engine.submit(p, max_tokens=2, **GREEDY) for p in PROMPTS[:3]]
        for r in choices + later:
            r.result(timeout=120)
        stats = engine.stats()
    assert stats["prompt_reads_shared"] == 3
    assert max(c.first_token_at for c in choices) < min(r.first_token_at for r in later)


def test_a_new_initial_state_is_not_followed_from_the_old(model):
    """A request admitted after `initial_state` changed neither follows a reader that
    started from the old one nor finds that reader's states in the cache (they are not
    stored once the start they grew from is replaced): it reads from the new start, as
    it would alone."""
    long_prompt, prompt = "".join(PROMPTS) * 3, PROMPTS[7]  # the start below changes the latter's reply
    old_start = alone(model, prompt, 4, **GREEDY).tokens
    primed = model.new_state()
    model.forward(list(b"SELECT name FROM users WHERE id = 1;\n-- "), primed)
    with rwkv_gpu.Engine(model, max_batch=4, max_prefill_tokens=4) as engine:
        reading = engine.submit(long_prompt, max_tokens=1, **GREEDY)
        before = engine.submit(prompt, max_tokens=4, **GREEDY)
        while not before._started:
            time.sleep(0.001)
        model.initial_state = primed
        try:
            after = engine.submit(long_prompt, max_tokens=1, **GREEDY)  # while `reading` reads it
            after.result(timeout=120)
            reading.result(timeout=120)
            assert after.submitted_at < reading.first_token_at  # it came while `reading` read
            assert before.result(timeout=120).tokens == old_start
            # Continuing `before`'s text: its final state (old start) must not be found.
            more = prompt + bytes(before.tokens).decode("utf-8", errors="replace") + "\n"
            continued = engine.submit(more, max_tokens=4, **GREEDY)
            want = alone(model, prompt, 4, **GREEDY).tokens, alone(model, more, 4, **GREEDY).tokens
            continued.result(timeout=120)
        finally:
            model.initial_state = None
        stats = engine.stats()
    assert after.cached_tokens == 0 and "prompt_reads_shared" not in stats
    assert want[0] != old_start  # the start makes a difference
    assert continued.cached_tokens < len(prompt) and continued.tokens == want[1]


def test_a_follower_let_in_may_follow_another_further(model):
    """n choices of S+Q arriving while another request reads S: they wait for S, and when
    let in there, the first reads Q and the others wait for it (not each reading Q)."""
    system = "# utilities for parsing and printing\nimport re\nimport sys\n\n" * 3
    question = PROMPTS[0] * 3
    with rwkv_gpu.Engine(model, max_batch=8, max_prefill_tokens=4) as engine:
        first = engine.submit(system + PROMPTS[1], max_tokens=2, cache_points=[len(system)], **GREEDY)
        while not first._started:
            time.sleep(0.001)
        choices = [engine.submit(system + question, max_tokens=3, cache_points=[len(system)], **dict(SEEDED, seed=i))
                   for i in range(3)]
        got = [c.result(timeout=120) for c in choices]
        first.result(timeout=120)
        stats = engine.stats()
    length = len(system + question)
    assert [c.cached_tokens for c in choices] == [len(system), length - 1, length - 1]
    assert stats["prompt_reads_shared"] == 3
    for i, completion in enumerate(got):
        assert completion.tokens == alone(model, system + question, 3, **dict(SEEDED, seed=i)).tokens


def test_a_follower_cancelled_during_a_scan_still_ends(model):
    """The scan of followers looks at each one's cancel once: a cancel landing between two
    looks must not drop it from the queue without ending it (a client would wait forever)."""

    class CancelledAfterTheFirstLook:
        looks = 0

        def is_set(self):  # the cancel lands just after the scan's first look
            self.looks += 1
            return self.looks > 1

        def set(self):
            pass

    prompt = "".join(PROMPTS) * 4
    engine = rwkv_gpu.Engine(model, max_batch=2, max_prefill_tokens=1)
    reader = engine.submit(prompt, max_tokens=2, **GREEDY)
    while not reader._started:
        time.sleep(0.001)
    follower = engine.submit(prompt, max_tokens=2, **GREEDY)
    deadline = time.monotonic() + 30
    while sum(map(len, reader._followers.values())) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    follower._cancelled = CancelledAfterTheFirstLook()
    follower.cancel()
    time.sleep(0.2)
    engine.close()
    assert follower.done and follower.finish_reason in ("cancelled", "closed")


def test_requests_following_a_reader_can_be_cancelled_and_closed(model):
    """A request waiting for another to read its prompt still counts as queued, ends
    cancelled when cancelled, and closed (not forgotten) when the engine closes."""
    prompt = "".join(PROMPTS) * 4
    engine = rwkv_gpu.Engine(model, max_batch=4, max_prefill_tokens=1)  # ~700 steps of prompt
    reader = engine.submit(prompt, max_tokens=2, **GREEDY)
    while not reader._started:
        time.sleep(0.001)
    followers = [engine.submit(prompt, max_tokens=2, **GREEDY) for _ in range(3)]
    deadline = time.monotonic() + 30
    while sum(map(len, reader._followers.values())) < 3:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.001)
    assert engine.stats()["queue_length"] == 3 and not any(f._started for f in followers)
    # A cancelled follower ends at the next step, not when the reader is through.
    followers[0].cancel()
    while not followers[0].done:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.001)
    assert followers[0].finish_reason == "cancelled" and engine.stats()["queue_length"] == 2
    assert reader.first_token_at is None  # still reading its prompt (a token a step)
    engine.close()
    assert reader.finish_reason == "closed" and "prompt_reads_shared" not in engine.stats()
    assert [f.finish_reason for f in followers[1:]] == ["closed", "closed"] and all(f.done for f in followers)


def test_a_cache_store_that_fails_does_not_fail_the_reader(model, monkeypatch):
    """Out of device memory for a cache entry's copy: the reader goes on uncached (its
    followers still start from its slot), and the failure is counted."""
    prompt = "".join(PROMPTS)
    with rwkv_gpu.Engine(model, max_batch=4, max_prefill_tokens=16) as engine:
        def no_memory(*_):
            raise rwkv_gpu.OutOfMemoryError("no device memory for the copy (test)")

        monkeypatch.setattr(engine.cache, "store", no_memory)
        requests = [engine.submit(prompt, max_tokens=4, **dict(SEEDED, seed=i)) for i in range(3)]
        got = [r.result(timeout=120) for r in requests]
        stats = engine.stats()
    assert [r.finish_reason for r in got] == ["length"] * 3 and stats.get("requests_failed", 0) == 0
    assert stats["prefix_cache_store_failures"] >= 1 and stats["prompt_reads_shared"] == 2
    for i, completion in enumerate(got):
        assert completion.tokens == alone(model, prompt, 4, **dict(SEEDED, seed=i)).tokens


def test_prefix_cache_is_bounded_in_bytes(model):
    per_state = model.state_bytes
    with rwkv_gpu.Engine(model, cache_bytes=3 * per_state) as engine:
        for p in PROMPTS + PROMPTS[-1:]:  # the last twice: its entries stored again
            engine.submit(p, max_tokens=2, **GREEDY).result(timeout=60)
        stats = engine.stats()
    assert stats["prefix_cache_entries"] <= 3 and stats["prefix_cache_bytes"] <= 3 * per_state
    assert stats["prefix_cache_bytes"] == stats["prefix_cache_entries"] * per_state  # kept as entries go


def test_logprobs_are_the_models(model):
    with rwkv_gpu.Engine(model) as engine:
        request = engine.submit(PROMPTS[0], max_tokens=3, top_logprobs=4, temperature=0.0,
                                presence_penalty=0.0, frequency_penalty=0.0, banned_tokens=())
        got = request.result(timeout=60)
    logits = model.forward(list(PROMPTS[0].encode()), model.new_state()).astype(np.float64)
    want = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    first = request.logprobs[0]
    assert first.token == got.tokens[0] == int(np.argmax(logits))
    # f32 log-softmax against float64 NumPy over a 256-entry vocabulary: 1e-4.
    assert abs(first.logprob - want[first.token]) < 1e-4
    assert [t for t, _ in first.top] == list(np.argsort(-want, kind="stable")[:4])
    np.testing.assert_allclose([lp for _, lp in first.top], np.sort(want)[::-1][:4], atol=1e-4)
    with pytest.raises(rwkv_gpu.InvalidOptionError, match="top_logprobs"):
        rwkv_gpu.Engine.submit(engine, "x", top_logprobs=21)


def test_asyncio_complete_and_stream(model):
    async def main(engine):
        completion = await engine.complete(PROMPTS[0], max_tokens=8, **GREEDY)
        pieces = [p async for p in engine.stream(PROMPTS[1], max_tokens=8, **GREEDY)]
        together = await asyncio.gather(*(engine.complete(p, max_tokens=6, **GREEDY) for p in PROMPTS[:4]))
        # Leaving a stream early cancels its request.
        stream = engine.stream(PROMPTS[2], max_tokens=10_000, **GREEDY)
        async for _ in stream:
            break
        await stream.aclose()
        return completion, "".join(pieces), together

    with rwkv_gpu.Engine(model) as engine:
        completion, streamed, together = asyncio.run(main(engine))
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0 and engine.stats().get("requests_finished_cancelled") == 1
    assert completion.tokens == alone(model, PROMPTS[0], 8, **GREEDY).tokens
    assert streamed == alone(model, PROMPTS[1], 8, **GREEDY).text
    assert [c.tokens for c in together] == [alone(model, p, 6, **GREEDY).tokens for p in PROMPTS[:4]]


def test_queue_full_and_close(model):
    threads_before = threading.active_count()
    engine = rwkv_gpu.Engine(model, max_batch=1, max_queue=2)
    running = engine.submit(PROMPTS[0], max_tokens=10_000, **GREEDY)
    while running.first_token_at is None:
        time.sleep(0.01)
    queued = [engine.submit(PROMPTS[1], max_tokens=4) for _ in range(2)]
    with pytest.raises(rwkv_gpu.QueueFullError, match="max_queue 2"):
        engine.submit(PROMPTS[2], max_tokens=4)
    # A request cancelled while waiting gives its place up at once (a client that left
    # cannot keep the queue full), ending as cancelled with nothing drawn.
    queued[0].cancel()
    queued.append(engine.submit(PROMPTS[2], max_tokens=4))
    assert queued[0].done and queued[0].finish_reason == "cancelled" and queued[0].tokens == []
    assert engine.stats()["queue_length"] == 2
    # And a later cancel too (the queue is scanned after each cancel, not only the first).
    queued[1].cancel()
    queued.append(engine.submit(PROMPTS[3], max_tokens=4))
    assert queued[1].done and queued[1].finish_reason == "cancelled"
    assert engine.stats()["queue_length"] == 2
    engine.close()
    assert running.finish_reason == "closed" and running.done
    assert all(q.finish_reason == "closed" for q in queued[2:])
    with pytest.raises(rwkv_gpu.EngineClosedError):
        engine.submit("x")
    assert threading.active_count() == threads_before
    # The model still works, and an engine may follow.
    with rwkv_gpu.Engine(model) as again:
        assert again.submit(PROMPTS[3], max_tokens=4, **GREEDY).result(timeout=60).tokens == alone(model, PROMPTS[3], 4, **GREEDY).tokens


def test_bad_engine_options(model):
    for kwargs, name in [({"max_batch": 0}, "max_batch"), ({"max_prefill_tokens": 0}, "max_prefill_tokens"),
                         ({"cache_bytes": -1}, "cache_bytes"), ({"max_batch": 2.5}, "max_batch")]:
        with pytest.raises(rwkv_gpu.InvalidOptionError, match=name):
            rwkv_gpu.Engine(model, **kwargs)


def test_a_long_embedding_lets_the_engine_step():
    """`embed` feeds a chunk per forward call and lets go of the model in between, and
    the model is taken in turn (first come, first served), so an Engine stream sharing the
    model draws between every two chunks of a long text being embedded. (One call over
    the whole text held the model throughout; and with std's Mutex the embedding thread
    mostly took it straight back.)"""
    model = open_model(DATA / "tiny-rwkv7" / "model.safetensors", tokenizer="bytes")
    chunk = model.config["chunk_tokens"]
    text = [int(t) for t in np.random.default_rng(0).integers(1, 256, 4 * chunk)]
    with rwkv_gpu.Engine(model) as engine:
        request = engine.submit([1, 2, 3], max_tokens=100_000, **GREEDY)
        while len(request.tokens) < 2:
            time.sleep(0.01)
        before = len(request.tokens)
        model.embed(text)
        during = len(request.tokens) - before
        request.cancel()
    assert during >= 3, during
