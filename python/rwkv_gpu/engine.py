"""The serving Engine: continuous batching of requests from any thread or from asyncio.

One scheduler thread owns the model's generation work. Between steps it admits waiting
requests into free slots of one block of states (so that every step reads the weights
once for the whole batch) and lets finished or cancelled ones go; long prompts are fed
in pieces of at most `max_prefill_tokens` per step, interleaved with the decoding of the
requests already running. The stepping itself is the one generation loop
(`_core.Batch` with `generation.TextStream`), as `Model.generate` uses it.

    engine = rwkv_gpu.Engine(model, max_batch=16)
    request = engine.submit("The capital of France is", max_tokens=16)
    for piece in request:
        print(piece, end="")
    print(await engine.complete("Hello", max_tokens=8))   # from asyncio
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _core, errors
from ._values import int_value, int_values
from .generation import MAX_TOKENS, STOP_TOKENS, Completion, TextStream, sampler_for
from .sampling import Sampler, Sampling, sampling_options
from .state_cache import StateCache

if TYPE_CHECKING:
    from .model import Model, State

_DONE = object()


@dataclass
class TokenInfo:
    """A drawn token, as handed out: its id, its log-probability and the most likely
    alternatives' (with `top_logprobs`; under the penalised logits at temperature 1)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


MAX_CACHE_POINTS = 8


class Request:
    """A submitted generation. Iterate it (from one thread) for text pieces, or call
    `result()`; `cancel()` ends it within one step. Afterwards `finish_reason` ("stop",
    "length", "cancelled", "closed"), `tokens`, `logprobs`, `prompt_tokens`,
    `cached_tokens` (prompt tokens not read: their state came from the prefix cache or
    from a request reading the same prompt) and `state` (the final
    state, when one was given or `return_state` asked for; a request cancelled or closed
    before its whole prompt was in leaves a given state as it was and returns none)
    describe it."""

    _ids = itertools.count()

    def __init__(self, ids: list[int], cache_points: Sequence[int], text: TextStream, sampler: Sampler,
                 state: State | None, return_state: bool, top_logprobs: int | None, use_cache: bool) -> None:
        self.id = next(Request._ids)
        self.ids = ids
        # The latest points only: each is a pause in the prefill and a cache entry, and a
        # conversation's next turn extends its latest messages.
        self.cache_points = sorted({p for p in int_values(cache_points, "cache_points") if 0 < p < len(ids)})[-MAX_CACHE_POINTS:]
        self.text = text
        self.sampler = sampler
        self.state = state
        self.return_state = return_state
        self.top_logprobs = top_logprobs
        self.use_cache = use_cache and state is None
        self.prompt_tokens = len(ids)
        self.cached_tokens = 0
        self.tokens: list[int] = []
        self.pieces: list[str] = []  # every text piece handed out, in order
        self.logprobs: list[TokenInfo] = []
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self._cancelled = threading.Event()
        self._on_cancel: Callable[[], None] | None = None  # the engine's note that a cancel happened
        self._finished = threading.Event()
        self._started = False
        self._items: collections.deque[Any] = collections.deque()
        self._ready = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        # Set by the engine while the request runs: its slot and sequence id.
        self._slot: int | None = None
        self._seq: int | None = None
        # While this request reads its prompt: the points where it will pause (their state
        # goes to the prefix cache) and, by point, the requests whose prompts start with
        # the same tokens up to there, waiting for that state.
        self._points: list[int] = []
        self._followers: dict[int, list[Request]] = {}
        self._start_version = 0  # the model's initial state it started from (its version)

    @property
    def finish_reason(self) -> str | None:
        return self.text.finish_reason

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Ends the request at the next step; the tokens handed out so far stay its
        result (and are in its state)."""
        self._cancelled.set()
        if self._on_cancel is not None and not self._started and not self.done:
            self._on_cancel()  # after the set: the engine's scan then sees it

    # ---- from the engine's thread ----

    def _push(self, item: Any) -> None:
        if item is not _DONE:
            self.pieces.append(item)
        with self._ready:
            self._items.append(item)
            self._ready.notify_all()
        self._notify()

    def _notify(self) -> None:
        if self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

    def _end(self, reason: str | None = None, error: BaseException | None = None) -> None:
        if reason is not None and self.text.finish_reason is None:
            self.text.finish_reason = reason
        self.error = error
        self.finished_at = time.monotonic()
        self._finished.set()
        self._push(_DONE)

    # ---- for the caller ----

    def _next(self, timeout: float | None = None) -> Any:
        with self._ready:
            if not self._ready.wait_for(lambda: bool(self._items), timeout):
                raise TimeoutError("the request produced nothing in time")
            return self._items.popleft()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._next()
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        """Waits for the end and returns the whole Completion (raises the request's error)."""
        if not self._finished.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return self.completion()

    def completion(self) -> Completion:
        return Completion("".join(self.pieces), self.finish_reason or "length", self.prompt_tokens, len(self.tokens), list(self.tokens))

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Lets the engine wake this event loop when something arrives."""
        if self._loop is None:
            self._wake = asyncio.Event()
            self._wake.set()  # look at what arrived before the loop was bound
            self._loop = loop

    async def started(self) -> None:
        """Waits until the request has a slot and its prompt checked, or has ended;
        raises its error if admitting it failed (a bad prompt)."""
        self._bind(asyncio.get_running_loop())
        assert self._wake is not None
        while not (self._started or self.done):
            self._wake.clear()
            if self._started or self.done:
                break
            await self._wake.wait()
        if self.error is not None:
            raise self.error

    async def _aiter(self) -> AsyncIterator[str]:
        assert self._wake is not None
        while True:
            with self._ready:
                item = self._items.popleft() if self._items else None
                if item is None:
                    self._wake.clear()
            if item is None:
                await self._wake.wait()
                continue
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item


class Engine:
    """Continuous batching over one model.

    Args:
        model: the Model (its generation calls from other threads still work; they take
            turns with the engine's steps).
        max_batch: requests running at once (one block of that many states); more wait
            in the queue.
        max_prefill_tokens: the most prompt tokens one step feeds over all requests still
            reading their prompt, so that a long prompt does not stall the others' streams.
        cache_bytes: device memory for the prefix cache (states after prompt prefixes:
            every prompt's `cache_points`, all of a prompt but its last token, and each
            request's final history); 0 turns it off. With it, requests arriving together
            whose prompts share a start up to a cache point (a system prompt; n choices of
            one prompt share all but the last token) read it once: the others wait for the
            first to read it and start from a copy of its state there.
        max_queue: requests waiting beyond this are refused (`QueueFullError`).
    """

    def __init__(self, model: Model, max_batch: int = 16, max_prefill_tokens: int = 512,
                 cache_bytes: int = 256 << 20, max_queue: int = 1024) -> None:
        for name, value, least in (("max_batch", max_batch, 1), ("max_prefill_tokens", max_prefill_tokens, 1),
                                   ("cache_bytes", cache_bytes, 0), ("max_queue", max_queue, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise errors.InvalidOptionError(f"{name} must be an int of at least {least}, got {value!r}")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.cache = StateCache(max_entries=1 << 30, max_bytes=cache_bytes) if cache_bytes else None
        self._slots = model.new_states(max_batch)
        self._free = list(range(max_batch - 1, -1, -1))
        self._start = model.new_state()
        self._start_version = model._initial_version
        self._batch = model._m.batch()
        self._batch.set_prefill_budget(max_prefill_tokens)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # by sequence id
        # Set by Request.cancel, so that the waiting queue is scanned only after a cancel.
        self._cancel_noted = False
        self._failure: BaseException | None = None  # what stopped the scheduler, if a bug did
        # The points where running requests will pause while reading their prompts (a
        # cache point, or all but the last token; the state there goes to the prefix
        # cache), by the tokens up to there: a request whose prompt starts with those
        # tokens, at a point of its own, waits for that state instead of reading them
        # again (n choices of one prompt, a system prompt many clients send at once).
        self._pending: dict[tuple[int, ...], Request] = {}
        # Guards what other threads read or change: `_waiting`, `_pending` with each
        # reader's `_points` and `_followers`, `_running`'s membership, `_closing`.
        self._cv = threading.Condition()
        self._closing = False
        self.counters: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._serve, name="rwkv-gpu-engine", daemon=True)
        self._thread.start()
        model._live_runs.add(self)

    # ---- submitting ----

    def submit(self, prompt: str | Sequence[int], *, max_tokens: int = MAX_TOKENS, state: State | None = None,
               return_state: bool = False, stop: Sequence[str] | str = (), stop_tokens: Sequence[int] = STOP_TOKENS,
               top_logprobs: int | None = None, cache_points: Sequence[int] = (), use_cache: bool = True,
               **options: Any) -> Request:
        """Queues a generation; returns its Request at once. Options as `Model.generate`
        (sampling keywords, stop strings and tokens, max_tokens). `state`: start from it
        and advance it (when the request ends); `return_state`: hand the final state back
        as `request.state` otherwise. `top_logprobs`: report each token's log-probability
        and that many alternatives (0 to `_core.max_top_logprobs`, 20). `cache_points`: prompt lengths after which the
        state is worth keeping in the prefix cache (ends of a system prompt or of earlier
        turns; the last MAX_CACHE_POINTS are kept). Bad options raise here; a bad prompt fails this request only."""
        text = TextStream(self.model._tokenizer_if_any(), max_tokens, stop, stop_tokens)
        sampler = sampler_for(self.model, Sampling(**sampling_options(dict(options), takes=())))  # checks the options
        if state is not None:
            self.model._check_state(state)
        if top_logprobs is not None and not 0 <= int_value(top_logprobs, "top_logprobs") <= _core.max_top_logprobs:
            raise errors.InvalidOptionError(
                f"top_logprobs must be between 0 and {_core.max_top_logprobs}, got {top_logprobs}")
        ids = self.model._prompt_ids(prompt)
        request = Request(ids, cache_points, text, sampler, state, return_state, top_logprobs, use_cache)
        request._on_cancel = self._note_cancel
        with self._cv:
            if self._closing:
                raise errors.EngineClosedError("the engine is closed")
            self._drop_cancelled_waiting()
            waiting = self._queue_length()
            if waiting >= self.max_queue:
                self.counters["requests_refused"] += 1
                raise errors.QueueFullError(f"{waiting} requests are waiting (max_queue {self.max_queue})")
            self._waiting.append(request)
            self.counters["requests_submitted"] += 1
            self._cv.notify()
        return request

    async def complete(self, prompt: str | Sequence[int], **options: Any) -> Completion:
        """`submit`, awaited to its Completion."""
        request = self.submit(prompt, **options)
        async for _ in self._watch(request):
            pass
        return request.completion()

    async def stream(self, prompt: str | Sequence[int], **options: Any) -> AsyncIterator[str]:
        """`submit`, streamed as text pieces; leaving the loop cancels the request."""
        request = self.submit(prompt, **options)
        async for piece in self._watch(request):
            yield piece

    async def _watch(self, request: Request) -> AsyncIterator[str]:
        request._bind(asyncio.get_running_loop())
        try:
            async for piece in request._aiter():
                yield piece
        finally:
            if not request.done:
                request.cancel()

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for metrics: requests, tokens, queue, occupancy, cache."""
        with self._cv:
            out: dict[str, Any] = dict(self.counters)
            out["queue_length"] = self._queue_length()
            out["running"] = len(self._running)
            out["max_batch"] = self.max_batch
        if self.cache is not None:
            out.update(prefix_cache_hits=self.cache.hits, prefix_cache_misses=self.cache.misses,
                       prefix_cache_tokens_saved=self.cache.tokens_saved, prefix_cache_bytes=self.cache.bytes,
                       prefix_cache_entries=len(self.cache))
        return out

    def close(self) -> None:
        """Stops the scheduler: running requests end with "closed" (their states hold
        what was handed out), waiting ones too; the thread is joined."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _close(self) -> None:  # the model is closing
        self.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the scheduler thread ----

    def _serve(self) -> None:
        failure: BaseException | None = None
        try:
            while True:
                with self._cv:
                    while not self._closing and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._closing:
                        break
                    self._drop_cancelled_waiting()
                    # Followers hold a place each: they start the moment their reader's
                    # state exists, not behind requests that came after them.
                    room = len(self._free) - self._following()
                    admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                for request in admitted:
                    self._admit(request)
                for request in [r for r in self._running.values() if r._cancelled.is_set()]:
                    self._retire(request, "cancelled")
                if self._running:
                    self._step()
        except BaseException as e:  # a bug here: no request may wait forever for it
            failure = self._failure = e
            raise
        finally:
            with self._cv:
                self._closing = True
            for request in list(self._running.values()):  # their followers end too
                try:
                    self._retire(request, "closed", failure)
                except BaseException:  # noqa: BLE001 (the others must still end)
                    if not request.done:
                        request._end("closed", failure)
            with self._cv:
                self._drop_cancelled_waiting()  # those end as cancelled, as they would have
                waiting, self._waiting = list(self._waiting), collections.deque()
            for request in waiting:
                request._end("closed", failure)

    def _following(self) -> int:
        """(With `_cv` held.) Requests waiting for a reader's state."""
        return sum(len(f) for r in self._readers() for f in r._followers.values())

    def _readers(self) -> list[Request]:
        """(With `_cv` held.) Requests with followers."""
        return [r for r in dict.fromkeys(self._pending.values()) if r._followers]

    def _queue_length(self) -> int:
        """(With `_cv` held.) Requests not yet admitted: queued, or following a reader."""
        return len(self._waiting) + self._following()

    def _drop_cancelled_waiting(self) -> None:
        """(With `_cv` held.) Requests cancelled while waiting leave the queue at once, so
        that their places are free, and end as cancelled without ever being admitted.
        Scans only when a cancel came since the last scan; the flag is cleared before the
        scan, so a cancel racing it sets the flag again for the next."""
        if not self._cancel_noted:
            return
        self._cancel_noted = False
        kept: collections.deque[Request] = collections.deque()
        for request in self._waiting:
            if request._cancelled.is_set():
                self._end_cancelled(request)
            else:
                kept.append(request)
        self._waiting = kept
        for reader in self._readers():  # and those following a reader
            for point, followers in list(reader._followers.items()):
                staying = []
                for follower in followers:  # one look at each: a cancel may land meanwhile
                    if follower._cancelled.is_set():
                        self._end_cancelled(follower)
                    else:
                        staying.append(follower)
                reader._followers[point] = staying

    def _end_cancelled(self, request: Request) -> None:
        """(With `_cv` held: the submitting threads count too.) Ends a request cancelled
        before it was admitted."""
        self.counters["requests_finished_cancelled"] += 1
        request._end("cancelled")

    def _note_cancel(self) -> None:
        self._cancel_noted = True  # a plain store: Request.cancel may run under any lock

    def _admit(self, request: Request, start_at: tuple[Request, int] | None = None) -> None:
        """Places the request (`_place`); a failure (a bad prompt, device memory for a new
        start) ends this request only, its slot freed: the others go on."""
        try:
            self._place(request, start_at)
        except BaseException as e:
            if request._slot is not None:
                self._free.append(request._slot)
                request._slot = None
            self.counters["requests_failed"] += 1
            request._end("error", e)

    def _place(self, request: Request, start_at: tuple[Request, int] | None) -> None:
        """Gives the request a slot and its start: its own state, the longest cached prefix
        of its prompt, or (`start_at`) a reader's slot, which holds the state after the
        given point of the prompt they share, and adds it to the batch. A request whose
        prompt starts with what a running request is reading up to one of its pauses
        (at a point of this request's own) follows that reader instead."""
        ids = request.ids
        if (version := self.model._initial_version) != self._start_version:  # initial_state changed
            # The version read first: a change landing meanwhile is caught next time.
            self._start, self._start_version = self.model.new_state(), version
            if self.cache is not None:
                self.cache.clear()
        request._start_version = self._start_version
        if start_at is not None and start_at[0]._start_version != self._start_version:
            start_at = None  # its state grew from the initial state since replaced
        caching = request.use_cache and self.cache is not None
        points = sorted({p for p in [*request.cache_points, len(ids) - 1] if 0 < p < len(ids)}) if caching else []
        # The longest shared prefix first; one let in at a reader's point may follow
        # another reader further (n choices of S+Q arriving while S is read).
        for point in reversed([p for p in points if start_at is None or p > start_at[1]]):
            reader = self._pending.get(tuple(ids[:point]))
            if reader is not None and reader._start_version == self._start_version:
                with self._cv:
                    reader._followers.setdefault(point, []).append(request)
                    if request._cancelled.is_set():  # a scan may have run while it was in no queue
                        self._cancel_noted = True
                return
        slot = request._slot = self._free.pop()
        start, at = request.state, 0
        if start_at is not None:
            reader, at = start_at
            assert reader._slot is not None
            start = self._slots[reader._slot]
        elif start is None and caching:
            assert self.cache is not None
            start, at = self.cache.find(self.model, ids[:-1])
        self.model._m.copy_state((start or self._start)._core, self._slots[slot]._core)
        # Where a state is worth caching, the prompt pauses (the state is stored there);
        # then it goes on and draws.
        pauses = [p for p in points if p > at]
        request._seq = self._batch.add(self._slots[slot]._core, request.sampler._core, ids[at:],
                                       [p - at for p in pauses], request.top_logprobs)
        request.cached_tokens = at
        self.counters["prompt_tokens_cached"] += at
        if start_at is not None:
            self.counters["prompt_reads_shared"] += 1
        with self._cv:
            for point in pauses:
                if self._pending.setdefault(tuple(ids[:point]), request) is request:
                    request._points.append(point)
            self._running[request._seq] = request
        self.counters["requests_admitted"] += 1
        request._started = True
        request._notify()

    def _step(self) -> None:
        try:
            stepped = self._batch.step()
        except BaseException as e:  # a device fault: every running request fails with it
            for running in list(self._running.values()):
                self._retire(running, "error", e)
            return
        self.counters["steps"] += 1
        self.counters["batch_occupancy_sum"] += len(self._running)
        for seq, token, paused_at, logprob, top in stepped:
            request = self._running.get(seq)
            if request is None:  # retired already (a failed removal leaves nothing behind)
                continue
            try:
                if token is None:
                    self._paused(request, paused_at)
                else:
                    self._drew(request, seq, token, logprob, top)
            except BaseException as e:  # this request only: the others go on
                self._retire(request, "error", e)

    def _drew(self, request: Request, seq: int, token: int, logprob: float | None, top: list[tuple[int, float]]) -> None:
        text = request.text.take(self._batch, seq, token)
        if token not in request.text.stop_tokens:  # a stop token is not handed out
            request.tokens.append(token)
            request.logprobs.append(TokenInfo(token, logprob, list(top)))
            self.counters["generated_tokens"] += 1
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
        if text:
            request._push(text)
        if request.finish_reason is not None:
            self._retire(request, None)

    def _paused(self, request: Request, fed: int) -> None:
        """The prompt is in up to a cache point: keep that state (and start the requests
        following this one from it)."""
        assert self.cache is not None and request._slot is not None
        read = request.cached_tokens + fed
        if self._current(request):
            self._store(request.ids[:read], self._slots[request._slot])
        self._let_followers_in(request, read)

    def _store(self, tokens: list[int], state: State) -> None:
        """Keeps a copy in the prefix cache. Without device memory for the copy the
        request goes on (or ends) uncached rather than failing: the cache is an aid."""
        assert self.cache is not None
        try:
            self.cache.store(self.model, tokens, state)
        except errors.RwkvError:
            self.counters["prefix_cache_store_failures"] += 1

    def _current(self, request: Request) -> bool:
        """Whether the request started from the current initial state: a state built on
        one that has since been replaced is not cached (its key would say otherwise)."""
        return request._start_version == self.model._initial_version

    def _let_followers_in(self, reader: Request, point: int | None) -> None:
        """The reader has read its prompt up to `point` (its slot holds that state, which
        each follower waiting there gets a copy of), or (None) has left the batch (its
        followers start as if just admitted: from the cache, or following another). They
        take the places held for them; cancelled ones end, and all end when closing."""
        with self._cv:
            done = [p for p in reader._points if point is None or p == point]
            if not done:
                return
            reader._points = [p for p in reader._points if p not in done]
            followers = []
            for p in done:
                del self._pending[tuple(reader.ids[:p])]
                followers += [(f, p) for f in reader._followers.pop(p, [])]
            closing = self._closing
        for follower, p in followers:
            if follower._cancelled.is_set():
                with self._cv:
                    self._end_cancelled(follower)
            elif closing:
                follower._end("closed", self._failure)
            else:
                self._admit(follower, None if point is None else (reader, p))

    def _retire(self, request: Request, reason: str | None, error: BaseException | None = None) -> None:
        """Takes the request out of the batch: its slot's state then holds the prompt and
        the tokens handed out, and goes to the request and the cache as asked. A request
        that ends before its whole prompt is in (cancelled, closed) is not fed the rest:
        its slot holds part of the prompt, which no one is given."""
        assert request._seq is not None and request._slot is not None
        slot = self._slots[request._slot]
        try:
            fed, _ = self._batch.remove(request._seq)
            if error is None:
                prompt_in = len(fed) - len(request.tokens) == len(request.ids) - request.cached_tokens
                self.counters["prompt_tokens"] += request.prompt_tokens
                if request.state is not None and prompt_in:
                    self.model._m.copy_state(slot._core, request.state._core)
                elif request.return_state and prompt_in:
                    request.state = slot.clone()
                if self.cache is not None and request.use_cache and prompt_in and self._current(request):
                    self._store(request.ids + request.tokens, slot)
        except BaseException as e:
            error = error or e
        finally:
            self._free.append(request._slot)
            request._slot = None
            self._let_followers_in(request, None)
        with self._cv:
            self._running.pop(request._seq, None)
            self.counters["requests_failed" if error is not None else f"requests_finished_{request.finish_reason or reason}"] += 1
        request._end("error" if error is not None else reason, error)
