"""The OpenAI-compatible server, used as a real client uses it: the official `openai`
package over HTTP on loopback (uvicorn in a thread), plus raw HTTP for malformed bodies.
Answers are compared with the library's own calls on the same model (greedy or seeded,
so they must be equal token for token)."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import rwkv_gpu
import uvicorn
from conftest import DATA, open_model
from rwkv_gpu.server import create_app

BYTES_MODEL = DATA / "trained-bytes" / "model.safetensors"
KEY = "sk-test-key"
NAME = "trained-bytes"


@contextlib.contextmanager
def serving(model, key=KEY, engine_options=None, name=NAME, **app_options):
    engine = rwkv_gpu.Engine(model, **(engine_options or {}))
    app = create_app(engine, name, api_key=key, **app_options)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()


@pytest.fixture(scope="module")
def model():
    return open_model(BYTES_MODEL)


@pytest.fixture(scope="module")
def url(model):
    with serving(model) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


GREEDY = {"temperature": 0.0}


def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_completion_equals_the_library(client, model):
    prompt = "import numpy as np\n\ndef "
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, **GREEDY)
    want = model.complete(prompt, max_tokens=12, **GREEDY)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt), 12)
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text
    as_ids = client.completions.create(model=NAME, prompt=list(prompt.encode()), max_tokens=12, **GREEDY)
    assert as_ids.choices[0].text == want.text


def test_chat_plain_and_streamed_equal_rwkv_chat(client, model):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    want = rwkv_gpu.Chat(model, system="You write Python.", max_tokens=24, **GREEDY).ask("A loop, please.")
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, **GREEDY)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == got.usage.prompt_tokens
    # The second request started from the prefix cache (the system turn and more).
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_stop_strings_across_tokens(client, model):
    prompt = "def main():\n    "
    free = model.complete(prompt, max_tokens=20, **GREEDY).text
    stop = free[5:9]  # four bytes: four tokens of this model
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, stop=[stop, "zzz"], **GREEDY)
    assert got.choices[0].text == free[:free.find(stop)] and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, stop=stop, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == free[:free.find(stop)]


def test_seeds_and_n(client, model):
    options = {"temperature": 1.0, "top_p": 0.9, "seed": 42, "max_tokens": 10}
    a = client.completions.create(model=NAME, prompt="x = ", n=2, **options)
    b = client.completions.create(model=NAME, prompt="x = ", n=2, **options)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # choice i draws with seed + i
    assert a.choices[0].text == model.complete("x = ", max_tokens=10, temperature=1.0, top_p=0.9, seed=42).text
    assert a.choices[1].text == model.complete("x = ", max_tokens=10, temperature=1.0, top_p=0.9, seed=43).text
    assert a.usage.completion_tokens == 20
    # OpenAI seeds may be negative: -1 wraps to 2**64 - 1, and its second choice to 0.
    wrapped = client.completions.create(model=NAME, prompt="x = ", n=2, **dict(options, seed=-1))
    sampled = {k: v for k, v in options.items() if k != "seed"}
    assert [c.text for c in wrapped.choices] == [model.complete("x = ", seed=s, **sampled).text for s in (2**64 - 1, 0)]


def test_logprobs(client):
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         logprobs=True, top_logprobs=3, **GREEDY)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-6  # greedy: the chosen token is the top one
    legacy = client.completions.create(model=NAME, prompt="ab", max_tokens=3, logprobs=2, **GREEDY)
    assert len(legacy.choices[0].logprobs.token_logprobs) == 3 and len(legacy.choices[0].logprobs.top_logprobs[0]) == 2
    # Streamed: the closing chunk of each choice carries its tokens' log-probabilities,
    # the same as the answer not streamed.
    streamed = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                              logprobs=True, top_logprobs=3, stream=True, **GREEDY)
    closing = [c.choices[0] for c in streamed if c.choices and c.choices[0].finish_reason is not None]
    assert len(closing) == 1 and closing[0].logprobs.content == content


def test_embeddings(client, model, url):
    got = client.embeddings.create(model=NAME, input=["hello", "world!"])
    want = model.embed(["hello", "world!"])
    np.testing.assert_array_equal(np.array([d.embedding for d in got.data], dtype=np.float32), want)
    raw = httpx.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": NAME, "input": "hello", "encoding_format": "base64"}).json()
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4"), want[0])


@pytest.mark.parametrize("options", [GREEDY, {"temperature": 1.0, "top_p": 0.8, "seed": 9}], ids=["greedy", "seeded"])
def test_responses_continue_from_the_stored_state(client, model, options):
    """A continued response equals the second turn of a Chat (which feeds only the new
    turn into the state the first left), with the same sampling."""
    chat = rwkv_gpu.Chat(model, max_tokens=16, **options)
    first_want, second_want = chat.ask("Write a function."), chat.ask("Now test it.")
    sent = {k: v for k, v in options.items() if k != "seed"}
    extra = {"seed": options["seed"]} if "seed" in options else None  # the client's responses.create has no seed
    first = client.responses.create(model=NAME, input="Write a function.", max_output_tokens=16, extra_body=extra, **sent)
    second = client.responses.create(model=NAME, input="Now test it.", previous_response_id=first.id,
                                     max_output_tokens=16, extra_body=extra, **sent)
    assert (first.output_text, second.output_text) == (first_want, second_want)
    assert second.usage.input_tokens == len("User: Now test it.\n\nAssistant:")


def test_evicted_response_is_a_clear_404(model):
    with serving(model, response_store_bytes=model.state_bytes) as url:  # room for one state
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        first = c.responses.create(model=NAME, input="one", max_output_tokens=2, **GREEDY)
        second = c.responses.create(model=NAME, input="two", max_output_tokens=2, **GREEDY)
        with pytest.raises(openai.NotFoundError, match="unknown or evicted"):
            c.responses.create(model=NAME, input="more", previous_response_id=first.id, max_output_tokens=2)
        assert c.responses.create(model=NAME, input="more", previous_response_id=second.id, max_output_tokens=2).output_text is not None
        metrics = httpx.get(f"{url}/metrics").text
    # "two" pushed out "one", then the continuation pushed out "two".
    assert "rwkv_stored_responses_evicted_total 2.0" in metrics


def test_api_key_and_error_format(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # no key needed
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (b"{not json", 400, None),
        (b'{"model": "trained-bytes"}', 400, "prompt"),
        (b'{"model": "trained-bytes", "prompt": "x", "temperature": -1}', 400, "temperature"),
        (b'{"model": "trained-bytes", "prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
        (b'{"model": "trained-bytes", "prompt": [65, 300]}', 400, None),
        (b'{"model": "other", "prompt": "x"}', 404, "model"),
    ]
    for body, status, param in cases:
        r = httpx.post(f"{url}/v1/completions", headers=auth | {"content-type": "application/json"}, content=body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param:
            assert error["param"] == param, (body, error)
    # A bad token id in a stream is answered before the stream starts.
    r = httpx.post(f"{url}/v1/completions", headers=auth, json={"model": NAME, "prompt": [65, 300], "stream": True})
    assert r.status_code == 400 and "token id 300" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="messages"):
        openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).chat.completions.create(model=NAME, messages=[])


def test_prompt_too_long_is_413(model):
    with serving(model, max_prompt_tokens=8) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=NAME, prompt="123456789", max_tokens=2)
        assert e.value.status_code == 413 and "at most 8" in str(e.value)


def test_n_choices_read_their_prompt_once(model):
    """The n requests of one prompt: the first reads it, the others start from the state
    it leaves in the prefix cache (the engine's counter says so), and draw as each would
    alone with its seed."""
    prompt = "def parse(text):\n    " * 20
    options = {"temperature": 1.0, "top_p": 0.9, "seed": 5, "max_tokens": 6}
    with serving(model) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        got = c.completions.create(model=NAME, prompt=prompt, n=4, **options)
        metrics = httpx.get(f"{url}/metrics").text
    assert "rwkv_prompt_reads_shared_total 3.0" in metrics
    sampled = {k: v for k, v in options.items() if k != "seed"}
    assert [ch.text for ch in got.choices] == [model.complete(prompt, seed=5 + i, **sampled).text for i in range(4)]


def test_queue_full_429_and_disconnect_frees_the_slot(model):
    """One slot, one place in the queue: a stream holds the slot, a second request waits,
    a third gets 429. Closing the stream (the client leaves) frees the slot within a step,
    and the waiting one completes."""
    with serving(model, engine_options={"max_batch": 1, "max_queue": 1}) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        stream = c.completions.create(model=NAME, prompt="a", max_tokens=5000, stream=True, **GREEDY)
        next(iter(stream))
        waiting: dict = {}
        t = threading.Thread(target=lambda: waiting.update(r=c.completions.create(model=NAME, prompt="b", max_tokens=3, **GREEDY)))
        t.start()
        deadline = time.monotonic() + 30
        while "rwkv_queue_length 1.0" not in httpx.get(f"{url}/metrics").text and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError, match="max_queue 1"):
            c.completions.create(model=NAME, prompt="c", max_tokens=3)
        stream.close()
        t.join(timeout=60)
        assert waiting["r"].choices[0].text == model.complete("b", max_tokens=3, **GREEDY).text
        metrics = httpx.get(f"{url}/metrics").text
    assert 'rwkv_requests_finished_total{reason="cancelled"} 1.0' in metrics
    assert "rwkv_requests_refused_total 1.0" in metrics


def test_device_lost_is_503():
    lost = open_model(DATA / "tiny-rwkv7" / "model.safetensors", tokenizer="bytes")
    with serving(lost, key=None) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert c.completions.create(model=NAME, prompt="ab", max_tokens=2).choices[0].text is not None
        lost._m._lose_device()
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=NAME, prompt="ab", max_tokens=2)
        assert e.value.status_code == 503


def test_metrics(client, url):
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, **GREEDY)
    text = httpx.get(f"{url}/metrics").text
    for name in ("rwkv_http_requests_total", "rwkv_generated_tokens_total", "rwkv_queue_length", "rwkv_batch_occupancy",
                 "rwkv_time_to_first_token_seconds_count", "rwkv_prefix_cache_hits_total", "rwkv_requests_finished_total"):
        assert name in text, name
    count = [line for line in text.splitlines() if line.startswith("rwkv_time_to_first_token_seconds_count")]
    assert float(count[0].split()[-1]) >= 1


def test_32_concurrent_streams_all_complete(client, url, model):
    """32 streaming clients at once (16 run, 16 wait for a slot): every stream completes
    with the text its prompt gives alone (greedy)."""
    import asyncio

    prompts = [f"Item {i}:" for i in range(4)]
    want = {p: rwkv_gpu.Chat(model, max_tokens=6, temperature=0.0).ask(p) for p in prompts}

    async def one(c, prompt):
        stream = await c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=6,
                                                 temperature=0.0, stream=True)
        pieces, reason = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
        return prompt, "".join(pieces), reason

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, prompts[i % 4]) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    for prompt, text, reason in results:
        assert text == want[prompt] and reason in ("stop", "length")


def test_request_limits(model):
    """What would cost the scheduler or the event loop without bound is refused before
    any work: too many or too long stop strings (matched against every drawn token), a
    body too big to be a prompt this server takes (by its Content-Length, or as it
    streams in without one), and text that is not Unicode (a lone surrogate)."""
    with serving(model, max_prompt_tokens=8) as url:  # bodies: at most 1 MiB
        headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}

        def post(path, body):
            content = json.dumps(body).encode() if isinstance(body, dict) else body
            return httpx.post(f"{url}/v1/{path}", headers=headers, content=content, timeout=60)

        for stop in (["x"] * 17, "y" * 257):
            r = post("completions", {"model": NAME, "prompt": "a", "stop": stop})
            assert r.status_code == 400 and r.json()["error"]["param"].startswith("stop"), r.text
        assert post("completions", {"model": NAME, "prompt": "a", "max_tokens": 2, "stop": ["x"] * 16}).status_code == 200
        big = b'{"model": "trained-bytes", "prompt": "' + b"a" * (1 << 20) + b'"}'
        for body in (big, iter([big[:1000], big[1000:]])):  # with a Content-Length, then chunked
            r = post("completions", body)
            assert r.status_code == 413 and "over 1048576 bytes" in r.json()["error"]["message"], r.text
        for path, body, param in [("completions", {"prompt": "\ud800"}, "prompt"),
                                  ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
                                  ("embeddings", {"input": ["ok", "\ud800"]}, "input")]:
            r = post(path, dict(body, model=NAME))
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)


def test_logprobs_are_bounded(url):
    """n x max tokens x (1 + alternatives) at most MAX_LOGPROB_ENTRIES (2**19): each
    choice, token and alternative is an entry built into one answer."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body, param in [("completions", {"prompt": "a", "n": 16, "max_tokens": 8192, "logprobs": 4}, "logprobs"),
                              ("chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 16,
                                                    "max_tokens": 2048, "logprobs": True, "top_logprobs": 20},
                               "top_logprobs")]:
        r = httpx.post(f"{url}/v1/{path}", headers=headers, json=dict(body, model=NAME), timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)
        assert "log-probabilities; this server returns at most 524288 per request" in r.json()["error"]["message"]
    # A small ask is answered, each choice with its tokens' entries.
    r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                   json={"model": NAME, "prompt": "a", "n": 2, "max_tokens": 2, "logprobs": 3, **GREEDY})
    assert r.status_code == 200 and [len(c["logprobs"]["tokens"]) for c in r.json()["choices"]] == [2, 2], r.text


def test_a_refused_choice_cancels_the_queued_ones(model):
    """n choices are queued together or not at all: when the queue refuses the third, the
    two already queued are cancelled (and leave the queue) instead of running unheard."""
    with serving(model, engine_options={"max_batch": 1, "max_queue": 2}) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        stream = c.completions.create(model=NAME, prompt="a", max_tokens=5000, stream=True, **GREEDY)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError, match="max_queue 2"):
            c.completions.create(model=NAME, prompt="b", max_tokens=3, n=3)
        deadline = time.monotonic() + 30
        while 'rwkv_requests_finished_total{reason="cancelled"} 2.0' not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, httpx.get(f"{url}/metrics").text
            time.sleep(0.05)
        assert "rwkv_queue_length 0.0" in httpx.get(f"{url}/metrics").text
        stream.close()


@pytest.mark.parametrize("path, body", [
    ("completions", {"prompt": "a", "max_tokens": 5000}),
    ("chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 5000, "n": 2}),
    ("responses", {"input": "a", "max_output_tokens": 5000}),
])
def test_a_client_that_leaves_a_plain_request_stops_its_generation(model, path, body):
    """Not streamed: the handler waits for the whole answer, and gives it up (cancelling
    every choice) when its client goes away, instead of generating to max_tokens."""
    with serving(model) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=2,
                       json=dict(body, model=NAME, temperature=0))
        cancelled = f'rwkv_requests_finished_total{{reason="cancelled"}} {float(body.get("n", 1))}'
        deadline = time.monotonic() + 30
        while cancelled not in (metrics := httpx.get(f"{url}/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        assert "rwkv_running_requests 0.0" in metrics, metrics


def test_a_stream_whose_client_left_while_queued_is_cancelled(model):
    """A streamed request waits for its slot before the response starts; when its client
    is gone by then, it is cancelled instead of generating to max_tokens for no one."""
    with serving(model, engine_options={"max_batch": 1, "max_queue": 1}) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        holder = c.completions.create(model=NAME, prompt="a", max_tokens=5000, stream=True, **GREEDY)
        next(iter(holder))
        with pytest.raises(httpx.ReadTimeout):  # queued behind `holder`: no byte comes
            httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=2,
                       json={"model": NAME, "prompt": "b", "max_tokens": 5000, "stream": True, "temperature": 0})
        # Its place in the queue is freed while `holder` still runs: a live client gets it.
        deadline = time.monotonic() + 30
        while 'rwkv_requests_finished_total{reason="cancelled"} 1.0' not in (metrics := httpx.get(f"{url}/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        assert "rwkv_running_requests 1.0" in metrics and "rwkv_queue_length 0.0" in metrics, metrics
        waiting: dict = {}
        t = threading.Thread(target=lambda: waiting.update(r=c.completions.create(model=NAME, prompt="c", max_tokens=2, **GREEDY)))
        t.start()
        holder.close()
        t.join(timeout=60)
        assert waiting["r"].choices[0].text == model.complete("c", max_tokens=2, **GREEDY).text


def post(url, path, body, key=KEY, **kwargs):
    return httpx.post(f"{url}/v1/{path}", headers={"Authorization": f"Bearer {key}"}, json=dict(body, model=NAME),
                      timeout=60, **kwargs)


@pytest.mark.parametrize("path, body", [
    ("completions", {"prompt": "hi", "max_tokens": 2}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("responses", {"input": "hi", "max_output_tokens": 2}),
])
@pytest.mark.parametrize("option, value", [
    ("presence_penalty", "abc"), ("frequency_penalty", -1e6), ("penalty_decay", 5), ("top_k", 1.5),
    ("logit_bias", {"x": 1.0}), ("logit_bias", {"300": 1.0}), ("logit_bias", {"65": 1000}),
])
def test_every_generating_endpoint_checks_the_sampling_options_alike(url, path, body, option, value):
    r = post(url, path, dict(body, **{option: value}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == option, r.text


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
])
def test_what_the_server_cannot_do_is_refused_not_ignored(url, extra, param):
    r = post(url, "chat/completions", dict({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, **extra))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ok = post(url, "chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [],
                                        "tool_choice": "none", "response_format": {"type": "text"}})
    assert ok.status_code == 200, ok.text


def test_logit_bias_is_applied(client, model):
    plain = client.completions.create(model=NAME, prompt="ab", max_tokens=1, **GREEDY).choices[0].text
    first = ord(plain)
    banned = client.completions.create(model=NAME, prompt="ab", max_tokens=1, logit_bias={str(first): -100}, **GREEDY)
    assert banned.choices[0].text != plain
    assert banned.choices[0].text == model.complete("ab", max_tokens=1, logit_bias={first: -100.0}, **GREEDY).text
    forced = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                            logit_bias={"113": 100}, **GREEDY)
    assert forced.choices[0].message.content == "qqq"


def test_completion_logprobs_streamed_and_with_echo(client):
    plain = client.completions.create(model=NAME, prompt="ab", max_tokens=3, logprobs=2, **GREEDY).choices[0]
    streamed = client.completions.create(model=NAME, prompt="ab", max_tokens=3, logprobs=2, stream=True, **GREEDY)
    closing = [c.choices[0] for c in streamed if c.choices and c.choices[0].finish_reason is not None]
    assert len(closing) == 1 and closing[0].logprobs == plain.logprobs
    # With echo the offsets point into the whole text, the prompt's included.
    echoed = client.completions.create(model=NAME, prompt="ab", max_tokens=3, logprobs=1, echo=True, **GREEDY).choices[0]
    assert echoed.text == "ab" + plain.text and echoed.logprobs.text_offset[0] == 2
    for token, at in zip(echoed.logprobs.tokens, echoed.logprobs.text_offset):
        assert echoed.text[at:at + len(token)] == token


def test_new_instructions_apply_to_a_continued_response(client):
    first = client.responses.create(model=NAME, input="Write a function.", max_output_tokens=2, temperature=0.0)
    without = client.responses.create(model=NAME, input="Go on.", previous_response_id=first.id, max_output_tokens=2,
                                      temperature=0.0)
    told = client.responses.create(model=NAME, input="Go on.", previous_response_id=first.id, max_output_tokens=2,
                                   temperature=0.0, instructions="Answer in French.")
    assert told.usage.input_tokens == without.usage.input_tokens + len("System: Answer in French.\n\n")
    with pytest.raises(openai.BadRequestError, match="input is empty"):
        client.responses.create(model=NAME, input=[], max_output_tokens=2)


def test_an_unhandled_error_is_an_openai_500_and_counted(model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(rwkv_gpu.Engine, "submit", broken)
    with serving(model) as url:
        r = post(url, "completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        assert "a bug" not in r.text  # details go to the log, not to clients
        metrics = httpx.get(f"{url}/metrics").text
    assert 'rwkv_http_requests_total{path="/v1/completions",status="500"} 1.0' in metrics, metrics


def test_metric_labels_are_a_fixed_set_and_auth_takes_any_case_of_bearer(url):
    for i in range(3):
        assert httpx.get(f"{url}/v1/junk-{i}").status_code == 401
        assert httpx.get(f"{url}/v1/junk-{i}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"BEARER  {KEY}"}).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    metrics = httpx.get(f"{url}/metrics").text
    assert "junk" not in metrics and 'path="other",status="401"' in metrics and 'path="other",status="404"' in metrics


def test_a_bad_body_names_the_field_not_the_union_member(url):
    r = post(url, "completions", {"prompt": {"text": "hi"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = post(url, "completions", {"prompt": [65, 300]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "token id 300" in r.text, r.text
    r = post(url, "embeddings", {"input": [[65, 999]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text


def test_a_model_name_with_a_slash_and_a_body_not_sent_as_json(model):
    with serving(model, key=None, name="org/model") as url:
        assert httpx.get(f"{url}/v1/models/org/model").json()["id"] == "org/model"
        missing = httpx.get(f"{url}/v1/models/org/other")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        form = httpx.post(f"{url}/v1/completions", content=b"model=org/model&prompt=hi",
                          headers={"content-type": "application/x-www-form-urlencoded"})
        assert form.status_code == 400 and "Content-Type: application/json" in form.json()["error"]["message"], form.text
