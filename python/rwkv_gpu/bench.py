"""Prefill and generation speed: `python -m rwkv_gpu.bench`.

pp<P>: prefill of P random tokens from a fresh state, logits for the last token only.
tg<N>: N single-token steps, each reading the full f32 logits back to the host and
taking the next token from them (argmax), as published tables do.
tg<N>-argmax: the same with the next token chosen on the device (8 bytes read back).
tg<N> @ d<D> (--depth): tg<N> after a prompt of D tokens, to show that time per token
does not grow with the context.
tg<N> x<B> (--batch): B sequences generating N tokens each, one forward_batch call per
step (each step reads the weights once for all B); t/s counts all B*N tokens.
"tg<N> x<B> engine": the same B generations as requests to a `rwkv_gpu.Engine` (the
serving scheduler: per-request sampling, on the device on GPUs (`sample_on` in the
header), text decoding and stop checks on the host).
ttft<L>: time to the first token of a generation: an L-token prompt (128, or P if
smaller) fed from a fresh state, logits read, token drawn; "cached" has a StateCache
holding all but its last 16 tokens (shown in seconds).
One warm-up run (shader compilation excluded), then --repetitions runs; tokens/s =
tokens / wall time, mean ± std. memory: device bytes the model holds (model.memory()).
Bandwidth bound: a copy kernel in the same run measures the bytes the device moves per
second (read + written); weights read per token / that = the fastest a decode step can
be, which each single-sequence tg row is given as a share of.
Progress goes to stderr; the table (or --json / --csv) to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from . import Engine, Model, Sampler, Sampling, State, StateCache, _core
from ._cli import add_quant_args, quant_layer_dtypes, reports_errors

SHAPES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1.5b": (24, 2048), "2.9b": (32, 2560), "7.2b": (32, 4096)}
# On a software adapter (lavapipe) everything runs on the CPU: shrink so a run takes
# about a minute and say so.
SOFTWARE_SHAPE = (2, 256)
SOFTWARE_LENGTHS = (64, 8)
TTFT_PROMPT = 128
CACHED_SUFFIX = 16
# The bandwidth probe: a buffer well past any cache, copied a few times (smaller on a
# software adapter, where a copy runs at well under 1 GB/s).
COPY_BYTES, COPY_REPETITIONS = 256 << 20, 10
SOFTWARE_COPY_BYTES, SOFTWARE_COPY_REPETITIONS = 16 << 20, 3


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


def time_runs(fn: Callable[[], None], repetitions: int) -> list[float]:
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


@dataclass
class Row:
    model: str
    dtype: str
    quant_int8: int
    quant_nf4: int
    test: str
    mean: float
    std: float
    unit: str  # "t/s" or "s"
    memory_bytes: int
    # --profile: what one call of this test records (see tests/test_work_counts.py).
    dispatches_per_layer: float | None = None
    submissions_per_token: float | None = None
    readbacks_per_token: float | None = None
    # --profile: host time of one submission of the last call (recording the first time a
    # chunk shape runs, then uploads and encoding; GPU waits excluded), microseconds.
    host_us_per_submission: float | None = None
    # Single-sequence tg rows: t/s over the bandwidth bound.
    fraction_of_bound: float | None = None


class Bench:
    """The tests, over one model; each returns (tokens, function to time)."""

    def __init__(self, model: Model, prefill: int, generate: int) -> None:
        self.model = model
        self.prefill = prefill
        self.generate = generate
        rng = np.random.default_rng(0)
        self.vocab = model.config["vocab_size"]
        self.prompt = [int(t) for t in rng.integers(0, self.vocab, max(prefill, TTFT_PROMPT))]
        self.rng = rng

    def pp(self) -> None:
        self.model.forward(self.prompt[: self.prefill], self.model.new_state())

    def tg(self, start: Callable[[], State], on_device: bool) -> Callable[[], None]:
        model = self.model

        def run() -> None:
            state = start()
            token = self.prompt[0]
            for _ in range(self.generate):
                if on_device:
                    token = model.forward_argmax([token], state)
                else:
                    token = int(np.argmax(model.forward([token], state)))

        return run

    def tg_batch(self, batch: int) -> Callable[[], None]:
        """`batch` sequences, each step's logits [B, V] read back and argmaxed on the host."""
        model = self.model

        def run() -> None:
            states = model.new_states(batch)
            tokens = [[t] for t in self.prompt[:batch]] if batch <= len(self.prompt) else [[self.prompt[0]]] * batch
            for _ in range(self.generate):
                logits = model.forward_batch(tokens, states)
                tokens = [[int(t)] for t in np.argmax(logits, axis=1)]

        return run

    def tg_engine(self, batch: int, engines: list[Engine]) -> Callable[[], None]:
        """`batch` requests at once through an Engine (continuous batching: sampling,
        text decoding and stop checks per request on the host), each generating N tokens
        after a one-token prompt."""
        engine = Engine(self.model, max_batch=batch, cache_bytes=0)
        engines.append(engine)  # closed by the caller after the runs

        def run() -> None:
            requests = [engine.submit([self.prompt[i % len(self.prompt)]], max_tokens=self.generate, temperature=0.0,
                                      stop_tokens=(), banned_tokens=()) for i in range(batch)]
            for request in requests:
                request.result()

        return run

    def ttft(self, cache: StateCache | None) -> Callable[[], None]:
        sampler = Sampler(self.vocab, Sampling(temperature=0.0, banned_tokens=()))
        length = min(TTFT_PROMPT, self.prefill)
        prefix = self.prompt[: max(length - CACHED_SUFFIX, 0)]
        if cache is not None and prefix:
            cache.prefill(self.model, prefix)

        def run() -> None:
            if cache is None:
                ids = self.prompt[:length]
            else:  # a new ending each time, as a chat's next question
                ids = prefix + [int(t) for t in self.rng.integers(0, self.vocab, length - len(prefix))]
            # The first step of a generation (as Model.generate, without text decoding):
            # feed the prompt (or what the cache lacks), read the logits, draw.
            state, rest = cache.resume(self.model, ids) if cache is not None else (self.model.new_state(), ids)
            batch = self.model._m.batch()
            batch.add(state._core, sampler._core, rest)
            batch.step()

        return run


def counts(model: Model, fn: Callable[[], None], tokens: int, calls: int) -> tuple[float, float, float, float]:
    """(dispatches per layer and chunk, submissions and read-backs per token, host µs per
    submission) of `fn`'s last forward call, from the runtime's own counters after
    running it once more: for tg that is one decode step; for pp, the whole prompt in
    chunks (one submission each)."""
    fn()
    submissions, _, readbacks, layer_dispatches = model._m.last_stats()
    per_call = tokens / calls
    host_us = model._m.last_host_ns() / 1e3 / submissions
    return layer_dispatches / (submissions * model.config["n_layer"]), submissions / per_call, readbacks / per_call, host_us


def kernel_profile(model: Model, fn: Callable[[], None]) -> dict[str, dict[str, float]] | None:
    """GPU time per kernel variant of `fn`'s last forward call (one decode step for tg,
    the whole prompt for pp), from timestamp queries around each dispatch (each in its
    own compute pass while profiling), with the bytes its dispatches must move at least
    (matrix products: weights, inputs, outputs; 0 where not stated); None where the
    device has no timestamp queries."""
    if not model._m.set_profiling(True):
        model._m.set_profiling(False)
        return None
    try:
        fn()
    finally:
        model._m.set_profiling(False)
    out: dict[str, dict[str, float]] = {}
    for name, ns, moves in model._m.last_profile():
        entry = out.setdefault(name, {"calls": 0, "us": 0.0, "bytes": 0})
        entry["calls"] += 1
        entry["us"] += ns / 1e3
        entry["bytes"] += moves
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us"]))


def sparse_reads(model: Model, fn: Callable[[], None]) -> dict[str, float] | None:
    """What the sparse ffn value projection read over `fn` (single-sequence decode): the
    share of its inputs that were zero, of groups of four inputs it read, and the weight
    bytes read per token against the dense bytes; None where no layer is stored
    input-major."""
    storage = model._m.ffn_value_storage()
    if not any(layout == "input-major" for layout, _ in storage):
        return None
    model._m.take_read_counts()
    model._m.set_counting_reads(True)
    try:
        fn()
    finally:
        model._m.set_counting_reads(False)
    counts = model._m.take_read_counts()
    read = groups = nonzero = inputs = 0
    bytes_read = dense = 0.0
    for (layout, nbytes), (g_read, g_all, nz, n) in zip(storage, counts):
        dense += nbytes
        if layout != "input-major" or g_all == 0:
            bytes_read += nbytes
            continue
        read, groups, nonzero, inputs = read + g_read, groups + g_all, nonzero + nz, inputs + n
        bytes_read += nbytes * g_read / g_all
    if groups == 0:
        return None
    return {"zero_inputs": 1 - nonzero / inputs, "groups_read": read / groups, "bytes_per_token": bytes_read, "dense_bytes_per_token": dense}


def load(args: argparse.Namespace) -> tuple[Model, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.model:
            n_layer = _core.checkpoint_config(args.model)["n_layer"]
            model = Model(args.model, adapter=args.adapter, layer_dtypes=quant_layer_dtypes(args, n_layer), quant_head=args.quant_head)
            name = args.model
        else:
            n_layer, n_embd = SHAPES[args.shape]
            probe = Model.random(1, 64, vocab_size=64, adapter=args.adapter)
            software = probe.config["device_type"] == "cpu"
            probe.close()
            name = f"random {args.shape}"
            if software and not args.full:
                n_layer, n_embd = SOFTWARE_SHAPE
                args.prefill_length = min(args.prefill_length, SOFTWARE_LENGTHS[0])
                args.generation_length = min(args.generation_length, SOFTWARE_LENGTHS[1])
                name = f"random {n_layer}x{n_embd} (shrunk)"
                log(f"software adapter: shrinking to {n_layer} layers x {n_embd} wide, pp{args.prefill_length}, "
                    f"tg{args.generation_length} (--full to keep the requested size)")
            log(f"building {name} ({n_layer} layers, {n_embd} wide) ...")
            model = Model.random(n_layer, n_embd, vocab_size=65536, adapter=args.adapter,
                                 layer_dtypes=quant_layer_dtypes(args, n_layer), quant_head=bool(args.quant_head))
    for message in dict.fromkeys(str(w.message) for w in caught):
        log(f"warning: {message}")
    return model, name


@reports_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkv_gpu.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint to load (.pth or .safetensors); default: random weights")
    ap.add_argument("--shape", choices=SHAPES, default="0.1b", help="shape of the random model (default 0.1b)")
    ap.add_argument("-p", "--prefill-length", type=int, default=512)
    ap.add_argument("-n", "--generation-length", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--depth", default="0", help="comma-separated prompt lengths to measure tg after (e.g. 0,4096,16384)")
    ap.add_argument("--batch", default="", help="comma-separated batch sizes for tg rows of several sequences (e.g. 4,16)")
    add_quant_args(ap)
    ap.add_argument("--adapter", help="adapter index or name substring (see rwkv_gpu.adapters())")
    ap.add_argument("--full", action="store_true", help="on a software adapter, keep the requested shape and lengths")
    ap.add_argument("--profile", action="store_true", help="also count dispatches, submissions and read-backs per test")
    ap.add_argument("--cold-start", action="store_true",
                    help="instead: time import -> load -> first token in fresh processes, with an empty and a filled pipeline cache")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    out.add_argument("--csv", action="store_true", help="print CSV instead of a markdown table")
    args = ap.parse_args(argv)
    try:
        depths = sorted({int(d) for d in args.depth.split(",") if d.strip()})
    except ValueError:
        ap.error(f"--depth takes comma-separated integers, got {args.depth!r}")
    try:
        batches = sorted({int(b) for b in args.batch.split(",") if b.strip()})
    except ValueError:
        ap.error(f"--batch takes comma-separated integers, got {args.batch!r}")
    if args.prefill_length < 1 or args.generation_length < 1 or args.repetitions < 1 or any(d < 0 for d in depths):
        ap.error("lengths and repetitions must be at least 1, depths at least 0")
    if any(b < 1 for b in batches):
        ap.error("batch sizes must be at least 1")

    if args.cold_start:
        from . import _cold_start
        n_layer, n_embd = SHAPES[args.shape]
        spec = {"model": args.model, "adapter": args.adapter, "dtype": args.dtype, "n_layer": n_layer, "n_embd": n_embd}
        log(f"cold start: {args.repetitions} fresh processes with an empty pipeline cache, then {args.repetitions} with it filled ...")
        print(_cold_start.table(_cold_start.measure(spec, args.repetitions), args.model or f"random {args.shape}"))
        return 0

    model, name = load(args)
    bench = Bench(model, args.prefill_length, args.generation_length)
    cfg = model.config
    formats = model.weight_formats()
    n_int8 = sum(formats.get(f"blocks.{i}.att.key") == "int8" for i in range(cfg["n_layer"]))
    n_nf4 = sum(formats.get(f"blocks.{i}.att.key") == "nf4" for i in range(cfg["n_layer"]))
    label = f"L{cfg['n_layer']} C{cfg['n_embd']}"
    p, n = args.prefill_length, args.generation_length

    tests: list[tuple[str, Callable[[], None], int, int, str]] = [  # name, fn, tokens, forward calls, unit
        (f"pp{p}", bench.pp, p, 1, "t/s"),
    ]
    for depth in depths:
        if depth == 0:
            start = model.new_state
            suffix = ""
        else:
            log(f"feeding a {depth}-token context for tg @ d{depth} ...")
            context = model.new_state()
            ids = np.random.default_rng(depth).integers(0, bench.vocab, depth)
            model.prefill(ids, context)
            start = context.clone
            suffix = f" @ d{depth}"
        tests.append((f"tg{n}{suffix}", bench.tg(start, on_device=False), n, n, "t/s"))
        tests.append((f"tg{n}-argmax{suffix}", bench.tg(start, on_device=True), n, n, "t/s"))
    engines: list[Engine] = []
    for batch in batches:
        tests.append((f"tg{n} x{batch}", bench.tg_batch(batch), batch * n, n, "t/s"))
        tests.append((f"tg{n} x{batch} engine", bench.tg_engine(batch, engines), batch * n, n, "t/s"))
    ttft_len = min(TTFT_PROMPT, p)
    tests.append((f"ttft{ttft_len}", bench.ttft(None), 1, 1, "s"))
    if ttft_len > CACHED_SUFFIX:
        tests.append((f"ttft{ttft_len} cached {ttft_len - CACHED_SUFFIX}", bench.ttft(StateCache(max_entries=4)), 1, 1, "s"))

    rows = []
    profiles: dict[str, dict[str, dict[str, float]] | None] = {}
    sparse: dict[str, float] | None = None
    for test, fn, tokens, calls, unit in tests:
        log(f"{test}:")
        times = time_runs(fn, args.repetitions)
        values = times if unit == "s" else [tokens / t for t in times]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        row = Row(label, cfg["dtype"], n_int8, n_nf4, test, statistics.mean(values), std, unit, sum(model.memory().values()))
        # The runtime's counters describe one forward call; an engine run ends with the
        # call that feeds its last tokens, so its rows show none.
        if args.profile and unit == "t/s" and not test.endswith(" engine"):
            (row.dispatches_per_layer, row.submissions_per_token, row.readbacks_per_token,
             row.host_us_per_submission) = counts(model, fn, tokens, calls)
            if test in (f"pp{p}", f"tg{n}"):
                profiles[test] = kernel_profile(model, fn)
            if test == f"tg{n}":
                sparse = sparse_reads(model, fn)
        rows.append(row)
    for engine in engines:
        engine.close()

    software = cfg["device_type"] == "cpu"
    copy_bytes = SOFTWARE_COPY_BYTES if software else COPY_BYTES
    log(f"bandwidth: copying {copy_bytes >> 20} MiB ...")
    bandwidth = model._m.copy_bandwidth(copy_bytes, SOFTWARE_COPY_REPETITIONS if software else COPY_REPETITIONS)
    bound = bandwidth / weight_bytes_per_token(model)
    for row in rows:
        if row.test.startswith("tg") and " x" not in row.test:
            row.fraction_of_bound = row.mean / bound

    host = process_memory()
    info = {
        "adapter": cfg["adapter"], "backend": cfg["backend"], "device_type": cfg["device_type"], "driver": cfg["driver"],
        "model": name, "n_layer": cfg["n_layer"], "n_embd": cfg["n_embd"], "vocab_size": cfg["vocab_size"],
        "weight_bytes_per_token": weight_bytes_per_token(model), "memory": model.memory(), "peak_host_rss": host["peak_rss"],
        "copy_bandwidth": bandwidth, "copy_bytes": min(copy_bytes, cfg["max_binding"]), "tg_bound": bound,
        "matmul_kernel": cfg["matmul_kernel"], "matmul_kernel_note": cfg["matmul_kernel_note"],
        "chunk_tokens": cfg["chunk_tokens"], "sample_on": cfg["sample_on"],
        "nf4_lookup": cfg["nf4_lookup"], "split_k": cfg["split_k"], "matvec_lanes": cfg["matvec_lanes"],
        "matvec_rows": cfg["matvec_rows"], "matvec_depth": cfg["matvec_depth"], "matvec_reduction": cfg["matvec_reduction"],
        "tuning": cfg["tuning"],
    }
    if args.profile:
        info["kernel_profile"] = profiles
        info["ffn_value_reads"] = sparse
    if args.json:
        print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
        return 0
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
        return 0
    print(f"adapter: {cfg['adapter']} | backend: {cfg['backend']} | device type: {cfg['device_type']} | driver: {cfg['driver']}")
    print(f"model: {name} | layers {cfg['n_layer']} | width {cfg['n_embd']} | vocab {cfg['vocab_size']} | dtype {cfg['dtype']} | "
          f"kernel choices: nf4 by {cfg['nf4_lookup']}, value projection split {cfg['split_k']}, matvec "
          f"{cfg['matvec_lanes']} lanes x {cfg['matvec_rows']} rows x {cfg['matvec_depth']} deep by {cfg['matvec_reduction']} "
          f"({cfg['tuning']})")
    print(f"prefill matrices: {cfg['matmul_kernel_note']} | chunks of up to {cfg['chunk_tokens']} tokens | "
          f"generation draws on the {cfg['sample_on']}")
    print(f"weights read per token: {info['weight_bytes_per_token'] / 1e6:.1f} MB (every matrix once; embedding row from "
          f"the host) | device memory: {sum(info['memory'].values()) / 1e9:.3f} GB | peak host RSS: {host['peak_rss'] / 1e9:.3f} GB")
    print(f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s (read + written, {info['copy_bytes'] >> 20} MiB buffer) | "
          f"decode bound (weights per token / bandwidth): {bound:.2f} t/s")
    print()
    count_columns = " dispatches/layer | submissions/token | read-backs/token | host µs/submission |" if args.profile else ""
    print(f"| model | dtype | quant_int8 | quant_nf4 | test | t/s | memory |{count_columns}")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: |" + (" ---: | ---: | ---: | ---: |" if args.profile else ""))
    for r in rows:
        unit = " s" if r.unit == "s" else ""
        line = f"| {r.model} | {r.dtype} | {r.quant_int8} | {r.quant_nf4} | {r.test} | {r.mean:.2f} ± {r.std:.2f}{unit} | {r.memory_bytes / 1e9:.3f} GB |"
        if args.profile:
            cells = [r.dispatches_per_layer, r.submissions_per_token, r.readbacks_per_token, r.host_us_per_submission]
            line += "".join(" - |" if v is None else f" {v:.2f} |" for v in cells)
        print(line)
    print()
    for r in rows:
        if r.fraction_of_bound is not None:
            print(f"{r.test}: {100 * r.fraction_of_bound:.1f}% of the bandwidth bound")
    if sparse is not None:
        print()
        print(f"ffn value, tg{n} (sparse decode): {100 * sparse['zero_inputs']:.1f}% of its inputs zero, "
              f"{100 * sparse['groups_read']:.1f}% of groups of four read | weights read per token: "
              f"{sparse['bytes_per_token'] / 1e6:.2f} MB of {sparse['dense_bytes_per_token'] / 1e6:.2f} MB dense "
              f"({100 * sparse['bytes_per_token'] / sparse['dense_bytes_per_token']:.1f}%)")
    for test, profile in profiles.items():
        print()
        if profile is None:
            print(f"{test}: no per-kernel GPU times (the adapter has no timestamp queries)")
            continue
        total = sum(e["us"] for e in profile.values())
        what = "one decode step" if test.startswith("tg") else "one call"
        print(f"GPU time per kernel, {test} ({what}; each dispatch timed alone): {total:.1f} µs")
        print()
        print("| kernel | dispatches | µs | share | GB/s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, e in profile.items():
            rate = f"{e['bytes'] / e['us'] / 1e3:.1f}" if e["bytes"] and e["us"] > 0 else "-"
            print(f"| {name} | {e['calls']:.0f} | {e['us']:.1f} | {100 * e['us'] / total:.1f}% | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
