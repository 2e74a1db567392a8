"""Errors as a Python programmer expects them: classes under rwkv_gpu that are also the
built-in exception they mean, every out-of-range option a ValueError naming the option,
state files written whole or not at all, command lines that print one error line."""

from __future__ import annotations

import copy
import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rwkv_gpu
from conftest import DATA, open_model

TINY = DATA / "tiny-rwkv7" / "model.safetensors"
BYTES = DATA / "trained-bytes" / "model.safetensors"  # vocab 256: the byte tokenizer


@pytest.mark.parametrize("name, builtins", [
    ("ShapeError", (ValueError,)),
    ("InvalidOptionError", (ValueError,)),
    ("ModelNotFoundError", (FileNotFoundError, rwkv_gpu.ModelLoadError)),
    ("ModelPermissionError", (PermissionError, rwkv_gpu.ModelLoadError)),
    ("OutOfMemoryError", (MemoryError, rwkv_gpu.DeviceError)),
    ("DeviceLostError", (RuntimeError, rwkv_gpu.DeviceError)),
    ("StateSaveError", (OSError, rwkv_gpu.StateError)),
    ("ModelSaveError", (OSError,)),
])
def test_classes_live_under_rwkv_gpu_and_subclass_the_builtins(name, builtins):
    cls = getattr(rwkv_gpu, name)
    assert cls.__module__ == "rwkv_gpu" and issubclass(cls, rwkv_gpu.RwkvError)
    for b in builtins:
        assert issubclass(cls, b), (name, b)
    assert repr(cls("x")).startswith(f"{name}(")


@pytest.fixture(scope="module")
def model():
    return open_model(BYTES)


@pytest.mark.parametrize("options, names", [
    ({"top_k": -5}, "top_k"),
    ({"banned_tokens": [-1]}, "banned token"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias token"),
    ({"banned_tokens": [2**70]}, "banned token"),
    ({"seed": -1}, "seed"),
])
def test_out_of_range_sampling_option_is_a_value_error_naming_it(model, options, names):
    state = model.new_state()
    before = state.to_numpy()
    with pytest.raises(ValueError, match=names) as info:
        model.complete([1, 2, 3], state=state, max_tokens=2, **options)
    assert isinstance(info.value, rwkv_gpu.RwkvError) and not isinstance(info.value, OverflowError)
    for k, v in state.to_numpy().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("tokens, shown", [
    ([2**63], str(2**63)),
    ([5, -(2**70)], str(-(2**70))),
    (np.array([2**64 - 1, 3], dtype=np.uint64), str(2**64 - 1)),
])
def test_huge_token_ids_are_reported_as_given(model, tokens, shown):
    # The byte model's vocabulary is 256: every id here is out of it.
    with pytest.raises(rwkv_gpu.ShapeError, match=f"token id {shown} at position"):
        model.forward(tokens, model.new_state())


@pytest.mark.parametrize("args, names", [((-1, 64), "n_layer"), ((1, -64), "n_embd"), ((1, 64, -3), "vocab_size")])
def test_random_model_with_negative_dimensions(args, names):
    with pytest.raises(rwkv_gpu.InvalidOptionError, match=f"{names} must not be negative"):
        rwkv_gpu.Model.random(*args)


@pytest.mark.parametrize("value", [-1, 2**70])
def test_a_max_binding_no_u64_holds_is_a_value_error_naming_it(value):
    with pytest.raises(rwkv_gpu.InvalidOptionError, match=f"max_binding .*{value}"):
        rwkv_gpu.Model.random(1, 64, vocab_size=16, max_binding=value)


@pytest.mark.parametrize("variable", [
    "RWKV_GPU_MATVEC_LANES", "RWKV_GPU_GEMM_LOADS", "RWKV_GPU_NF4_LOOKUP", "RWKV_GPU_MAX_BINDING", "RWKV_GPU_SPLIT_K",
    "RWKV_GPU_MATVEC_ROWS", "RWKV_GPU_MATVEC_DEPTH", "RWKV_GPU_TUNE", "RWKV_GPU_CHUNK_TOKENS", "RWKV_GPU_SAMPLE_ON",
])
def test_a_bad_environment_value_is_a_value_error_naming_the_variable(monkeypatch, variable):
    # These variables choose kernel variants; a typo must not silently mean the default.
    monkeypatch.setenv(variable, "bogus")
    with pytest.raises(rwkv_gpu.InvalidOptionError, match=f"{variable}.*bogus"):
        rwkv_gpu.Model.random(1, 64, 256)


def test_failed_state_save_keeps_the_old_file_and_leaves_no_partial_file(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: the second save fails
    part way through writing, in a child process so the limit binds nothing else."""
    target = tmp_path / "chat.state"
    script = textwrap.dedent(f"""
        import resource, signal, warnings, errno
        warnings.simplefilter("ignore")
        import rwkv_gpu
        m = rwkv_gpu.Model({str(TINY)!r})
        s = m.new_state()
        s.save({str(target)!r})
        m.forward([1, 2, 3], s)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            s.save({str(target)!r})
        except rwkv_gpu.StateError as e:
            assert isinstance(e, OSError) and e.errno == errno.EFBIG, repr(e)
            print("refused", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr
    assert "could not write the state" in out.stdout
    assert os.listdir(tmp_path) == ["chat.state"]  # no temporary left behind
    model = open_model(TINY)
    zero = model.load_state(target).to_numpy()  # the first, zero state: intact
    assert all(not v.any() for v in zero.values())


def test_state_save_to_a_missing_folder(model, tmp_path):
    with pytest.raises(rwkv_gpu.StateSaveError) as info:
        model.new_state().save(tmp_path / "no" / "such" / "x.state")
    assert info.value.errno == errno.ENOENT and "could not write the state" in str(info.value)


def run_cli(*args, stdin=""):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("args, says", [
    (["rwkv_gpu.bench", "--model", "/nonexistent.pth"], "No such file or directory"),
    (["rwkv_gpu.generate", "--model", str(BYTES), "--top-k", "-5", "hi"], "top_k must not be negative"),
    (["rwkv_gpu.quantize", "/nonexistent.pth", "/tmp/out.safetensors", "--dtype", "int8"], "No such file or directory"),
])
def test_command_lines_print_one_error_line(args, says):
    out = run_cli(*args)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], out.stderr


def test_chat_save_to_a_bad_path_keeps_the_session(tmp_path):
    out = run_cli("rwkv_gpu.chat", "--model", str(BYTES), "-n", "2",
                  "--temperature", "0", stdin=f"/save {tmp_path}/no/such/x.state\nhello\n/quit\n")
    assert out.returncode == 0, out.stderr
    assert "error: " in out.stderr and "could not write the state" in out.stderr
    assert "Assistant: " in out.stdout  # the session went on to answer


def test_no_stray_lines_without_a_desktop_session():
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    out = subprocess.run([sys.executable, "-c", "import rwkv_gpu; rwkv_gpu.adapters()"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "XDG_RUNTIME_DIR" not in out.stderr, out.stderr


def test_close_ends_live_generations():
    model = open_model(BYTES)
    single = model.generate("def ", max_tokens=50, temperature=0.0)
    batch = model.generate_batch(["def ", "x = "], max_tokens=50, temperature=0.0)
    assert next(single) and next(batch)
    model.close()
    assert list(single) == [] and list(batch) == []
    with pytest.raises(rwkv_gpu.RwkvError, match="closed"):
        model.new_state()


def test_ctrl_c_during_generation_leaves_exactly_the_given_tokens_in_the_state():
    """Ctrl-C (here `_thread.interrupt_main` from a timer, in a child process) arrives as
    a step returns; the drawn token the caller never took must not reach the state. The
    state is checked bit for bit against a fresh one fed the prompt and the run's tokens
    in the same calls the run made (the prompt at once, then one token a call)."""
    script = textwrap.dedent(f"""
        import _thread, signal, threading, warnings
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
        import numpy as np
        warnings.simplefilter("ignore")
        import rwkv_gpu
        from rwkv_gpu.sampling import Sampling
        m = rwkv_gpu.Model({str(BYTES)!r})
        prompt = list(b"def main():")
        interrupted = 0
        for delay in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3):
            state = m.new_state()
            run = m._run(prompt, state, 100000, Sampling(temperature=0.0), (), (), None)
            timer = threading.Timer(delay, _thread.interrupt_main)
            timer.start()
            try:
                for _ in run:
                    pass
            except KeyboardInterrupt:
                interrupted += 1
            timer.cancel()
            want = m.new_state()
            m.forward(prompt, want)
            for t in run.tokens:
                m.forward([t], want)
            got, ref = state.to_numpy(), want.to_numpy()
            assert all(np.array_equal(got[k], ref[k]) for k in got), (delay, len(run.tokens))
        print("interrupted", interrupted)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "interrupted 6" in out.stdout, out.stdout


def test_ctrl_c_during_a_long_prefill_arrives_soon_and_leaves_the_state_as_it_was():
    """A 60k-token call (forward, prefill, batch, embed, greedy argmax) is interrupted one second in:
    KeyboardInterrupt comes within 3 s (the issue's bound; here a chunk takes a fraction
    of that), the state is bit-identical to before the call, and the model goes on giving
    the golden logits."""
    script = textwrap.dedent(f"""
        import _thread, signal, threading, time, warnings
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
        import numpy as np
        warnings.simplefilter("ignore")
        import rwkv_gpu
        m = rwkv_gpu.Model({str(TINY)!r})
        cases = np.load({str(DATA / "tiny-rwkv7" / "cases.npz")!r})
        state = m.new_state()
        m.forward(cases["prompt"][:5], state)
        before = state.to_numpy()
        for call in ("forward", "prefill", "batch", "embed", "argmax"):
            fired = []
            timer = threading.Timer(1.0, lambda: (fired.append(time.perf_counter()), _thread.interrupt_main()))
            timer.start()
            try:
                tokens = [i % 512 for i in range(60000)]
                if call == "forward":
                    m.forward(tokens, state, all_logits=True)
                elif call == "prefill":
                    m.prefill(tokens, state)
                elif call == "embed":
                    m.embed([tokens, tokens[:9]], pooling="mean")
                elif call == "argmax":
                    m.forward_argmax(tokens, state)
                else:
                    m.forward_batch([tokens, tokens[:9]], [state, m.new_state()])
                raise SystemExit(call + ": not interrupted")
            except KeyboardInterrupt:
                late = time.perf_counter() - fired[0]
            assert late < 3.0, (call, late)
            after = state.to_numpy()
            assert all(np.array_equal(after[k], before[k]) for k in before), call
        fresh = m.new_state()
        np.testing.assert_allclose(m.forward(cases["prompt"], fresh, all_logits=True), cases["prompt_logits"], atol=1e-3, rtol=0)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr + out.stdout


def test_ctrl_c_during_load_raises_and_leaves_nothing_behind():
    script = textwrap.dedent(f"""
        import _thread, signal, warnings
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
        warnings.simplefilter("ignore")
        import rwkv_gpu
        seen = []
        def progress(done, total):
            seen.append(done)
            if done == 3:
                _thread.interrupt_main()
        for dtype in (None, "int8", "nf4"):  # a plain load, and loads that quantize
            seen.clear()
            try:
                rwkv_gpu.Model({str(TINY)!r}, dtype=dtype, progress=progress)
                raise SystemExit(f"{{dtype}}: not interrupted")
            except KeyboardInterrupt:
                pass
            assert max(seen) < 10, (dtype, seen)  # stopped at the next tensor, not at the end
        m = rwkv_gpu.Model({str(TINY)!r})
        m.forward([1, 2, 3], m.new_state())
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr + out.stdout


def test_ctrl_c_during_the_prompt_of_a_generation_or_chat_turn():
    """The prompt prefill inside generate / Chat.send is interrupted like any long call:
    soon, the state as before, nothing fed, and a Chat turn that never happened leaves no
    history (its text is sent again with the next message)."""
    script = textwrap.dedent(f"""
        import _thread, signal, threading, time, warnings
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
        import numpy as np
        warnings.simplefilter("ignore")
        import rwkv_gpu
        from rwkv_gpu.sampling import Sampling
        m = rwkv_gpu.Model({str(BYTES)!r})
        long_prompt = list(b"x = 1\\n" * 10000)

        def interrupted(body):
            fired = []
            timer = threading.Timer(1.0, lambda: (fired.append(time.perf_counter()), _thread.interrupt_main()))
            timer.start()
            try:
                body()
            except KeyboardInterrupt:
                return time.perf_counter() - fired[0]
            raise SystemExit("not interrupted")

        state = m.new_state()
        run = m._run(long_prompt, state, 5, Sampling(temperature=0.0), (), (), None)
        late = interrupted(lambda: list(run))
        assert late < 3.0, late
        assert run.tokens == [] and run.fed_tokens() == []
        assert not any(v.any() for v in state.to_numpy().values())

        chat = rwkv_gpu.Chat(m, max_tokens=3, temperature=0.0)
        before = chat.state.to_numpy()
        late = interrupted(lambda: chat.ask("y = 2\\n" * 10000))
        assert late < 3.0, late
        assert chat.history == [] and chat.tokens == []
        after = chat.state.to_numpy()
        assert all(np.array_equal(after[k], before[k]) for k in before)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr + out.stdout


def test_device_memory_exhausted_is_out_of_memory_and_harms_nothing():
    """A million states (67 GB for the tiny model) under an address-space limit that lets
    lavapipe's device allocations fail as a GPU's would: OutOfMemoryError (also a
    MemoryError), then this model and another give exactly the results they gave."""
    script = textwrap.dedent(f"""
        import resource, warnings
        import numpy as np
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))
        warnings.simplefilter("ignore")
        import rwkv_gpu
        m = rwkv_gpu.Model({str(TINY)!r})
        other = rwkv_gpu.Model({str(BYTES)!r})
        want = m.forward([1, 2, 3], m.new_state())
        want_other = other.forward([1, 2, 3], other.new_state())
        try:
            m.new_states(10**6)
            raise SystemExit("allocated")
        except rwkv_gpu.OutOfMemoryError as e:
            assert isinstance(e, MemoryError), repr(e)
        assert np.array_equal(m.forward([1, 2, 3], m.new_state()), want)
        assert np.array_equal(other.forward([1, 2, 3], other.new_state()), want_other)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr + out.stdout


def test_lost_device_is_device_lost_error_and_a_new_model_works(tiny_cases):
    model = open_model(TINY)
    state = model.new_state()
    model.forward([1, 2, 3], model.new_state())  # the scratch made, three tokens' kernels compiled
    model._m._lose_device()
    # A kernel never compiled before (one token's decode): the device, not the shader.
    with pytest.raises(rwkv_gpu.DeviceLostError, match="lost"):
        model.forward([1], state)
    with pytest.raises(rwkv_gpu.DeviceLostError, match="lost"):
        model.forward([1, 2, 3], state)
    with pytest.raises(rwkv_gpu.DeviceLostError):
        model.new_state()
    fresh = open_model(TINY)
    np.testing.assert_allclose(fresh.forward(tiny_cases["prompt"], fresh.new_state(), all_logits=True),
                               tiny_cases["prompt_logits"], atol=1e-3, rtol=0)


def test_unknown_names_are_invalid_option_errors_listing_the_known(model):
    """Kernel, output and pooling names are parsed in the core, which lists the ones it knows."""
    first = rwkv_gpu._core.kernels[0]
    with pytest.raises(rwkv_gpu.InvalidOptionError, match=f'unknown kernel "nope"; kernels: .*"{first}"'):
        rwkv_gpu.kernel_source("nope")
    with pytest.raises(rwkv_gpu.InvalidOptionError, match='want must be one of .*"hidden_all".*, got "bogus"'):
        model._m.forward([1], model.new_state()._core, "bogus")
    with pytest.raises(rwkv_gpu.InvalidOptionError, match="pooling must be 'last' or 'mean', got \"max\""):
        model.embed([1, 2], pooling="max")
    assert issubclass(rwkv_gpu.InvalidOptionError, ValueError)


def test_logits_for_too_long_an_input_are_out_of_memory_not_an_abort():
    """all_logits over 200k tokens at a 65536 vocabulary is 52 GB of output: allocated
    fallibly, refused before anything runs (the address space is capped at 8 GB, as
    above, so that this holds on machines of any size). The process lives on, the states
    are as they were, and the same calls at a sane length work."""
    script = textwrap.dedent("""
        import resource, warnings
        import numpy as np
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))
        warnings.simplefilter("ignore")
        import rwkv_gpu
        m = rwkv_gpu.Model.random(1, 64, vocab_size=65536)
        long = [1] * 200_000
        a, b = m.new_state(), m.new_state()  # separate pages: forward_batch's grouped path
        m.forward([5], a)
        before = [s.to_numpy()["wkv"].copy() for s in (a, b)]
        calls = [lambda: m.forward(long, a, all_logits=True),
                 lambda: m.forward_batch([long, long], [a, b], all_logits=True),
                 lambda: m.forward_batch([long, [1]], m.new_states(2), all_logits=True)]
        for call in calls:
            try:
                call()
                raise SystemExit("allocated")
            except rwkv_gpu.OutOfMemoryError as e:
                assert "host memory" in str(e) and "output" in str(e), str(e)
        for s, was in zip((a, b), before):
            assert np.array_equal(s.to_numpy()["wkv"], was)
        assert m.forward([1] * 3, a, all_logits=True).shape == (3, 65536)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr + out.stdout


# ---- values of the wrong kind: refused by name, before anything runs ----
# An integer is an int or a NumPy integer, never a float (1.5 would be truncated), a bool
# or text ("12" would be read as digits or as the ids 1 and 2).

def assert_state_is(state, before):
    for k, v in state.to_numpy().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.fixture(scope="module")
def engine(model):
    e = rwkv_gpu.Engine(model, max_batch=2, cache_bytes=0)
    yield e
    e.close()


@pytest.mark.parametrize("stop", [[b"\n\n"], [5], b"\n\n", 5, ["ok", None]])
def test_a_stop_of_the_wrong_kind_is_refused_before_anything_is_fed(model, engine, stop):
    state = model.new_state()
    model.forward([65], state)
    before = state.to_numpy()
    calls = [lambda: model.complete("hi", state, max_tokens=3, stop=stop),
             lambda: list(model.generate("hi", state, max_tokens=3, stop=stop)),
             lambda: model.complete_batch(["hi"], [state], max_tokens=3, stop=stop),
             lambda: engine.submit("hi", max_tokens=3, stop=stop, state=state)]
    for call in calls:
        with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
            call()
        assert_state_is(state, before)
    assert engine.stats().get("requests_submitted", 0) == 0


@pytest.mark.parametrize("options, name", [
    ({"max_tokens": float("nan")}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"top_k": 1.5}, "top_k"),
    ({"seed": 1.5}, "seed"),
    ({"temperature": "0.5"}, "temperature"),
    ({"banned_tokens": [1.5]}, "banned_tokens"),
    ({"banned_tokens": "12"}, "banned_tokens"),
    ({"logit_bias": {1.5: 1.0}}, "logit_bias"),
    ({"logit_bias": {1: "big"}}, "logit_bias"),
    ({"logit_bias": [(1, 2.0, 3.0)]}, "logit_bias"),
    ({"stop_tokens": "12"}, "stop_tokens"),
    ({"stop_tokens": [True]}, "stop_tokens"),
])
def test_options_of_the_wrong_kind_are_type_errors_naming_them(model, engine, options, name):
    state = model.new_state()
    before = state.to_numpy()
    with pytest.raises(TypeError, match=name):
        model.complete([1, 2, 3], state, **options)
    assert_state_is(state, before)
    with pytest.raises(TypeError, match=name):
        engine.submit([1, 2, 3], **options)


@pytest.mark.parametrize("options, name", [
    ({"top_logprobs": 1.5}, "top_logprobs"),
    ({"top_logprobs": "3"}, "top_logprobs"),
    ({"cache_points": [1.5]}, "cache_points"),
    ({"cache": "junk"}, "cache"),  # an Engine has its own prefix cache
])
def test_engine_refuses_its_own_options_of_the_wrong_kind_in_submit(engine, options, name):
    with pytest.raises(TypeError, match=name):
        engine.submit([1, 2, 3], max_tokens=2, **options)
    assert engine.stats().get("requests_submitted", 0) == 0


@pytest.mark.parametrize("option", ["stop", "stop_tokens", "cache"])
def test_chat_refuses_options_it_does_not_take(model, option):
    """A reply ends at the next turn, so stop strings and tokens are the chat's own."""
    chat = rwkv_gpu.Chat(model, max_tokens=2, **{option: ["x"]})
    with pytest.raises(TypeError, match=f"unknown generation option.*{option}"):
        chat.ask("hi")
    with pytest.raises(TypeError, match="message must be a string"):
        rwkv_gpu.Chat(model, max_tokens=2).ask(None)
    assert chat.tokens == [] and chat.history == []


def test_logit_bias_as_pairs_or_as_a_dict_is_the_same_in_every_call(model, engine):
    opts = dict(max_tokens=4, temperature=1.0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0, seed=3)
    want = model.complete("hi", logit_bias={65: 30.0}, **opts)
    assert want.tokens == [65] * 4  # the bias is felt
    assert model.complete("hi", logit_bias=[(65, 30.0)], **opts).tokens == want.tokens
    assert "".join(model.generate("hi", logit_bias=[(65, 30.0)], **opts)) == want.text
    assert model.complete_batch(["hi"], logit_bias=[(65, 30.0)], **opts)[0].tokens == want.tokens
    assert engine.submit("hi", logit_bias=[(65, 30.0)], **opts).result().tokens == want.tokens


@pytest.mark.parametrize("tokens", [
    lambda: (t for t in [1.7, 2.9]), lambda: iter(["65", " 66 "]), lambda: iter([True, 2]), lambda: map(float, [1, 2]),
])
def test_token_ids_from_an_iterator_are_checked_like_a_list(model, tokens):
    """An iterator is read once: its values are checked, not a second, empty pass."""
    state = model.new_state()
    before = state.to_numpy()
    with pytest.raises(rwkv_gpu.ShapeError, match="tokens must hold ints"):
        model.forward_argmax(tokens(), state)
    assert_state_is(state, before)
    assert model.forward_argmax((t for t in [1, 2]), model.new_state()) == model.forward_argmax([1, 2], model.new_state())


def test_generation_without_a_tokenizer_gives_tokens_as_the_engine_does():
    """A vocabulary with no tokenizer (random, 300 ids) generates token ids, no text,
    through every call; text needs a tokenizer and says so."""
    bare = rwkv_gpu.Model.random(1, 64, vocab_size=300)
    got = bare.complete([1, 2], max_tokens=3, temperature=0.0, stop_tokens=[])
    assert got.text == "" and len(got.tokens) == 3 and got.finish_reason == "length"
    assert bare.complete_batch([[1, 2]], max_tokens=3, temperature=0.0, stop_tokens=[])[0].tokens == got.tokens
    with rwkv_gpu.Engine(bare, max_batch=1, cache_bytes=0) as e:
        assert e.submit([1, 2], max_tokens=3, temperature=0.0, stop_tokens=[]).result().tokens == got.tokens
    with pytest.raises(rwkv_gpu.RwkvError, match="no tokenizer known for a vocabulary of 300"):
        bare.complete("text", max_tokens=3)


def test_a_state_cache_refuses_another_models_state(model):
    other = rwkv_gpu.Model.random(1, 64, vocab_size=256, tokenizer="bytes")
    cache = rwkv_gpu.StateCache(max_entries=1)
    with pytest.raises(rwkv_gpu.StateError, match="another model"):
        cache.store(model, [1, 2], other.new_state())
    with pytest.raises(TypeError, match="tokens must hold ints"):
        cache.store(model, [1.5], model.new_state())
    assert len(cache) == 0 and cache.bytes == 0


def test_integer_arguments_of_the_wrong_kind_are_type_errors_naming_them():
    with pytest.raises(TypeError, match="n_layer"):
        rwkv_gpu.Model.random(1.5, 64, 256)
    with pytest.raises(TypeError, match="n_embd"):
        rwkv_gpu.Model.random(1, "64", 256)
    with pytest.raises(rwkv_gpu.InvalidOptionError, match="vocab_size must not be negative"):
        rwkv_gpu.Sampler(-1)
    with pytest.raises(rwkv_gpu.InvalidOptionError, match="token must not be negative"):
        rwkv_gpu.Sampler(16).record(-1, b"")
    with pytest.raises(TypeError, match="token must be an int"):
        rwkv_gpu.Sampler(16).record(1.5, b"")
    # Past the core's fixed widths: the project's error naming the value, not a bare OverflowError.
    m = rwkv_gpu.Model.random(1, 64, vocab_size=256, tokenizer="bytes")
    with pytest.raises(rwkv_gpu.InvalidOptionError, match=f"n must be .*{2**64}"):
        m.new_states(2**64)
    with pytest.raises(rwkv_gpu.InvalidOptionError, match="max_batch|n must"):
        rwkv_gpu.Engine(m, max_batch=2**64)
    batch = m._m.batch()
    for call, name in [(lambda: batch.record(-1, 1, b""), "sequence id"), (lambda: batch.record(0, 2**32, b""), "token"),
                       (lambda: batch.remove(2**64), "sequence id"), (lambda: batch.finish([-1]), "sequence id"),
                       (lambda: m._m.copy_bandwidth(-1), "bytes")]:
        with pytest.raises(rwkv_gpu.InvalidOptionError, match=name):
            call()
    assert m.tokenizer.token_bytes(2**40) is None


def test_tokenizers_refuse_text_for_ids_and_ids_for_text():
    for tok in (rwkv_gpu.Tokenizer.byte_level(), rwkv_gpu.Tokenizer.world()):
        with pytest.raises(TypeError, match="token ids must be a list of ints, not text"):
            tok.decode("12")
        with pytest.raises(TypeError, match="token ids must hold ints"):
            tok.decode([1.9])
        with pytest.raises(TypeError, match="encode takes a string"):
            tok.encode(5)
        assert tok.decode(np.array([65, 66])) == tok.decode([65, 66]) != ""


def test_copies_of_a_state_are_clones_and_states_take_real_numbers_only(model):
    state = model.new_state()
    model.forward([1, 2], state)
    before = state.to_numpy()
    for twin in (copy.copy(state), copy.deepcopy(state)):
        assert_state_is(twin, before)
        model.forward([3], twin)
        assert_state_is(state, before)
    arrays = {k: v.astype(np.complex64) for k, v in before.items()}
    with pytest.raises(rwkv_gpu.ShapeError, match="att_shift has dtype complex64"):
        model.state_from_numpy(arrays)
    assert len(model.new_states(np.int64(2))) == 2


# ---- threads, signals and the interpreter's exit ----

def run_script(script, timeout=300):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout)


def test_a_long_call_and_a_thread_asking_for_the_model_do_not_deadlock():
    """A long call on the main thread asks for the GIL between its submissions (for
    signals) while holding the model; another thread asking for the model (memory(), a
    batch's length) must wait with the GIL released. Both ways round, and through an
    Engine; a hang fails the test through the timeout."""
    out = run_script("""
        import threading, warnings
        warnings.simplefilter("ignore")
        import rwkv_gpu
        m = rwkv_gpu.Model.random(1, 64, vocab_size=256, tokenizer="bytes")
        long = list(range(1, 256)) * 3  # several chunks
        def ask(done):
            while not done.is_set():
                m.memory()
        for where in ("main", "thread"):
            done = threading.Event()
            if where == "main":
                t = threading.Thread(target=ask, args=(done,)); t.start()
                for _ in range(3):
                    m.forward(long, m.new_state())
                done.set()
            else:
                t = threading.Thread(target=lambda: [m.forward(long, m.new_state()) for _ in range(3)] and done.set())
                t.start()
                ask(done)
            t.join()
        with rwkv_gpu.Engine(m) as engine:
            request = engine.submit(long * 3, max_tokens=3)
            while not request.done:
                m.memory()
        print("ok")
    """, timeout=240)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr + out.stdout


def test_exiting_while_other_threads_are_inside_calls_is_clean():
    """At exit, an Engine never closed and a daemon thread in a long forward: calls come
    back out before finalization (a thread taking the GIL back during it would crash
    the process); later calls are refused with StateError. Several runs: the crash was
    a race."""
    script = """
        import threading, time, warnings
        warnings.simplefilter("ignore")
        import rwkv_gpu
        m = rwkv_gpu.Model.random(1, 64, vocab_size=256, tokenizer="bytes")
        engine = rwkv_gpu.Engine(m)
        engine.submit(list(range(1, 256)) * 40, max_tokens=5)
        def loop():
            while True:
                m.forward(list(range(1, 256)) * 8, m.new_state())
        threading.Thread(target=loop, daemon=True).start()
        time.sleep(0.5)
        print("exiting")
    """
    for _ in range(3):
        out = run_script(script, timeout=120)
        assert out.returncode == 0 and "exiting" in out.stdout, (out.returncode, out.stderr[-2000:])


def test_a_signal_handler_calling_into_the_model_mid_call_is_refused_not_deadlocked():
    out = run_script("""
        import signal, warnings
        warnings.simplefilter("ignore")
        import numpy as np
        import rwkv_gpu
        m = rwkv_gpu.Model.random(1, 64, vocab_size=256, tokenizer="bytes")
        other = m.new_state()
        for call in (m.memory, lambda: m.forward([1], other)):
            signal.signal(signal.SIGALRM, lambda *_: call())
            state = m.new_state()
            m.forward([5], state)
            before = state.to_numpy()
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            try:
                m.forward(list(range(1, 256)) * 40, state)
                raise SystemExit("not interrupted")
            except rwkv_gpu.StateError as e:
                assert "in the middle of a call on this thread" in str(e), e
            signal.setitimer(signal.ITIMER_REAL, 0)
            after = state.to_numpy()
            assert all(np.array_equal(after[k], before[k]) for k in before)
        print("ok")
    """, timeout=240)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr + out.stdout


def test_an_interrupted_call_or_step_of_a_few_pieces_changes_nothing():
    """Ctrl-C inside a forward of 200 tokens (paced in pieces of 64 while interruptible)
    leaves the state as it was; inside a batch step reading half a prompt, it leaves the
    batch as it was, so the next steps read the prompt from where they were."""
    out = run_script("""
        import signal, warnings
        warnings.simplefilter("ignore")
        import numpy as np
        import rwkv_gpu
        def alarm(*_):
            raise KeyboardInterrupt("alarm")
        signal.signal(signal.SIGALRM, alarm)
        m = rwkv_gpu.Model.random(1, 64, vocab_size=256, tokenizer="bytes")
        prompt = list(range(1, 201)) * 3
        same = lambda a, b: all(np.array_equal(a[k], b[k]) for k in a)
        whole = m.new_state(); m.forward([5], whole); m.forward(prompt[:200], whole)
        whole = whole.to_numpy()
        interrupted = 0
        for delay in (0.001, 0.003, 0.01):
            state = m.new_state()
            m.forward([5], state)
            before = state.to_numpy()
            signal.setitimer(signal.ITIMER_REAL, delay)
            try:
                m.forward(prompt[:200], state)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                # Inside the call (the state as before), or just after it returned (the
                # handler runs at Python's next instruction: the call's work all done).
                interrupted += same(state.to_numpy(), before)
            signal.setitimer(signal.ITIMER_REAL, 0)
            after = state.to_numpy()
            assert same(after, before) or same(after, whole), delay  # never part way
        assert interrupted >= 1
        greedy = rwkv_gpu.Sampler(256, rwkv_gpu.Sampling(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0))
        alone = m._m.batch()
        alone.add(m.new_state()._core, greedy._core, prompt)
        want = alone.step()[0][1]
        for delay in (0.0005, 0.001, 0.002, 0.004, 0.008):
            b = m._m.batch()
            b.set_prefill_budget(300)
            seq = b.add(m.new_state()._core, greedy._core, prompt)
            signal.setitimer(signal.ITIMER_REAL, delay)
            try:
                b.step()
            except KeyboardInterrupt:
                pass
            signal.setitimer(signal.ITIMER_REAL, 0)
            if b.fed(seq) == []:  # interrupted inside the step (not after it returned)
                break
        else:
            raise SystemExit("no step was interrupted inside")
        assert b.step() == [] and b.fed(seq) == prompt[:300]
        (got,) = b.step()
        assert b.fed(seq) == prompt and got[1] == want, (got, want)
        with_unknown = m._m.batch()
        try:
            with_unknown.finish([99])
            raise SystemExit("finished an unknown sequence")
        except rwkv_gpu.StateError:
            pass
        print("ok")
    """, timeout=240)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr + out.stdout
