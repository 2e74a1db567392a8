"""Prefill and generation speed: `python -m rwkv_gpu.bench`.

pp<N>: prefill of N random tokens from a fresh state, logits for the last token only.
tg<N>: N single-token steps, each reading the full f32 logits back and taking the next
token from them (argmax), as published tables do. ttft<N>: time to the first token of a
generation (prompt of N tokens fed, logits read, token drawn), from a fresh state and
with a StateCache that holds all but the last 16 prompt tokens (shown in seconds).
One warm-up run (shader compilation excluded), then --repetitions runs; tokens/s =
tokens / wall time, mean ± std.
Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import numpy as np

from . import Model, Sampling, StateCache, _core
from ._cli import add_quant_args, quant_layer_dtypes

SHAPES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1.5b": (24, 2048), "2.9b": (32, 2560), "7.2b": (32, 4096)}
# On a software adapter (lavapipe) everything runs on the CPU: shrink so a run takes
# about a minute and say so.
SOFTWARE_SHAPE = (2, 256)
SOFTWARE_LENGTHS = (64, 8)


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def process_memory() -> dict[str, int]:
    """This process's resident set now and at its peak, in bytes (Linux /proc; elsewhere
    the peak from getrusage for both)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak_rss": int(fields["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024
        return {"rss": peak, "peak_rss": peak}


def time_runs(fn, repetitions: int) -> list[float]:
    fn()  # warm-up: compiles the shaders, allocates scratch
    times = []
    for i in range(repetitions):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        log(f"  run {i + 1}/{repetitions}: {times[-1]:.3f} s")
    return times


def weight_bytes_per_token(model: Model) -> int:
    """Device bytes of every weight a decode step reads: all matrices (codes and scales),
    the layer vectors and the head. Exact: each is read once per step."""
    mem = model.memory()
    return sum(mem[k] for k in ("weights_fp16", "weights_int8", "weights_nf4", "weights_f32", "head"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkv_gpu.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint to load (.pth or .safetensors); default: random weights")
    ap.add_argument("--shape", choices=SHAPES, default="0.1b", help="shape of the random model (default 0.1b)")
    ap.add_argument("-p", "--prefill-length", type=int, default=512)
    ap.add_argument("-n", "--generation-length", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    add_quant_args(ap)
    ap.add_argument("--adapter", help="adapter index or name substring (see rwkv_gpu.adapters())")
    ap.add_argument("--full", action="store_true", help="on a software adapter, keep the requested shape and lengths")
    args = ap.parse_args(argv)
    if args.prefill_length < 1 or args.generation_length < 1 or args.repetitions < 1:
        ap.error("lengths and repetitions must be at least 1")

    def layer_dtypes(n_layer: int) -> list[str] | None:
        return quant_layer_dtypes(args, n_layer)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.model:
            n_layer = _core.checkpoint_config(args.model)["n_layer"]
            model = Model(args.model, adapter=args.adapter, layer_dtypes=layer_dtypes(n_layer), quant_head=args.quant_head)
            name = args.model
        else:
            n_layer, n_embd = SHAPES[args.shape]
            probe = Model.random(1, 64, vocab_size=64, adapter=args.adapter)
            software = probe.config["device_type"] == "cpu"
            probe.close()
            pp, tg = args.prefill_length, args.generation_length
            name = f"random {args.shape} ({n_layer} layers, {n_embd} wide)"
            if software and not args.full:
                n_layer, n_embd = SOFTWARE_SHAPE
                pp, tg = min(pp, SOFTWARE_LENGTHS[0]), min(tg, SOFTWARE_LENGTHS[1])
                name = f"random {n_layer} layers x {n_embd} (shrunk for a software adapter)"
                log(f"software adapter: shrinking to {n_layer} layers x {n_embd} wide, pp{pp}, tg{tg} (--full to keep the requested size)")
                args.prefill_length, args.generation_length = pp, tg
            log(f"building {name} ...")
            model = Model.random(n_layer, n_embd, vocab_size=65536, adapter=args.adapter,
                                 layer_dtypes=layer_dtypes(n_layer), quant_head=args.quant_head)
    for message in dict.fromkeys(str(w.message) for w in caught):
        log(f"warning: {message}")

    cfg = model.config
    rng = np.random.default_rng(0)
    vocab = cfg["vocab_size"]
    prompt = rng.integers(0, vocab, args.prefill_length)

    def prefill() -> None:
        model.forward(prompt, model.new_state())

    state_holder: dict[str, object] = {}

    def generate() -> None:
        state = model.new_state()
        token = int(prompt[0])
        for _ in range(args.generation_length):
            logits = model.forward([token], state)
            token = int(np.argmax(logits))
        state_holder["state"] = state

    greedy = Sampling(temperature=0.0, banned_tokens=())
    suffix_length = min(16, args.prefill_length - 1)
    prefix = [int(t) for t in prompt[: args.prefill_length - suffix_length]]
    cache = StateCache(max_entries=4)

    def first_token(cache: StateCache | None, ids: list[int]) -> None:
        # One generation step: feed the prompt (or what the cache lacks), read, draw.
        model._run(ids, None, 1, greedy, (), (), cache)._core.step()

    def ttft_fresh() -> None:
        first_token(None, [int(t) for t in prompt])

    def ttft_cached() -> None:
        suffix = [int(t) for t in rng.integers(0, vocab, suffix_length)]
        first_token(cache, prefix + suffix)

    if suffix_length > 0:
        cache.prefill(model, prefix)

    rows = []
    tests = [
        (f"pp{args.prefill_length}", prefill, args.prefill_length),
        (f"tg{args.generation_length}", generate, args.generation_length),
        (f"ttft{args.prefill_length}", ttft_fresh, 1),
    ]
    if suffix_length > 0:
        tests.append((f"ttft{args.prefill_length} cached {len(prefix)}", ttft_cached, 1))
    for test, fn, tokens in tests:
        log(f"{test}:")
        times = time_runs(fn, args.repetitions)
        # Rates for throughput tests, seconds for latency (ttft) tests.
        values = times if test.startswith("ttft") else [tokens / t for t in times]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append((test, statistics.mean(values), std))

    if suffix_length > 0:
        log(f"StateCache: {cache.hits} hits, {cache.tokens_saved} prompt tokens not fed again")
    mem = model.memory()
    total_gb = sum(mem.values()) / 1e9
    print(f"adapter: {cfg['adapter']} | backend: {cfg['backend']} | device type: {cfg['device_type']} | driver: {cfg['driver']}")
    print(f"model: {name} | layers {cfg['n_layer']} | width {cfg['n_embd']} | vocab {vocab} | dtype {cfg['dtype']}")
    print()
    formats = model.weight_formats()
    n_int8 = sum(formats.get(f"blocks.{i}.att.key") == "int8" for i in range(cfg["n_layer"]))
    n_nf4 = sum(formats.get(f"blocks.{i}.att.key") == "nf4" for i in range(cfg["n_layer"]))
    print(f"weight bytes read per token: {weight_bytes_per_token(model) / 1e6:.1f} MB (every matrix once; "
          f"embedding row from the host)")
    print()
    print("| model | dtype | quant_int8 | quant_nf4 | test | t/s | memory |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: |")
    for test, mean, std in rows:
        unit = " s" if test.startswith("ttft") else ""
        print(f"| L{cfg['n_layer']} C{cfg['n_embd']} | {cfg['dtype']} | {n_int8} | {n_nf4} | {test} | {mean:.2f} ± {std:.2f}{unit} | {total_gb:.3f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
