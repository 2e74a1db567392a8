"""Load on the OpenAI-compatible server, over loopback, with the official client.

    python benches/serve_load.py [--model PATH] [--clients 32] [--max-tokens 32]

1. `--clients` concurrent clients each stream `--rounds` chat completions: requests/s,
   tokens/s (streamed pieces; one per token on a byte-level model), time to first token
   p50/p99, time between tokens p50/p99, over every stream. Every stream must complete.
2. A long prompt arriving while `--streams` streams run: the gaps between those streams'
   tokens while it is fed, with the Engine's prefill budget (`--max-prefill-tokens`) and
   without one (the whole prompt in one step), back to back.

The server runs in this process (uvicorn on a thread) on a fresh Engine for each part.
Default model: the trained byte-level test model (tests/data/trained-bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "tests" / "data" / "trained-bytes" / "model.safetensors"


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


class Server:
    def __init__(self, model, **engine_options) -> None:
        import rwkv_gpu
        import uvicorn
        from rwkv_gpu.server import create_app

        self.engine = rwkv_gpu.Engine(model, **engine_options)
        app = create_app(self.engine, "bench", max_prompt_tokens=1 << 20)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.engine.close()


async def stream_times(client, **request) -> tuple[float, list[float]]:
    """(submission time, arrival time of each piece) of one streamed chat completion."""
    start = time.perf_counter()
    arrivals = []
    stream = await client.chat.completions.create(stream=True, **request)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    return start, arrivals


async def load(url: str, clients: int, rounds: int, max_tokens: int) -> dict[str, float]:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as client:
        return await _load(client, clients, rounds, max_tokens)


async def _load(client, clients: int, rounds: int, max_tokens: int) -> dict[str, float]:
    results: list[tuple[float, list[float]]] = []

    async def one(i: int) -> None:
        for r in range(rounds):
            results.append(await stream_times(client, model="bench", max_tokens=max_tokens, temperature=1.0, seed=i * 1000 + r,
                                              messages=[{"role": "user", "content": f"Tell me about item {i}."}]))

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - start
    ttft = [a[0] - s for s, a in results if a]
    gaps = [b - a for _, arr in results for a, b in zip(arr, arr[1:])]
    pieces = sum(len(a) for _, a in results)
    complete = sum(1 for _, a in results if a)
    return {"requests": len(results), "complete": complete, "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": pieces / wall, "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "tbt_p50": percentile(gaps, 50), "tbt_p99": percentile(gaps, 99)}


async def long_prompt(url: str, streams: int, prompt_tokens: int) -> dict[str, float]:
    """Gaps between the running streams' tokens while a prompt of `prompt_tokens` bytes is
    fed (from its submission to its first token), and before it came."""
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as client:
        return await _long_prompt(client, streams, prompt_tokens)


async def _long_prompt(client, streams: int, prompt_tokens: int) -> dict[str, float]:
    arrivals: list[list[float]] = [[] for _ in range(streams)]

    async def follow(i: int) -> None:
        # A completion without stop strings: it runs until cancelled.
        stream = await client.completions.create(model="bench", max_tokens=8000, temperature=1.0, seed=i, stream=True,
                                                 prompt=f"Chapter {i + 1}\n\n")
        try:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    arrivals[i].append(time.perf_counter())
        finally:
            await stream.close()

    running = [asyncio.ensure_future(follow(i)) for i in range(streams)]
    await asyncio.sleep(2.0)  # the streams are going
    text = ("All work and no play makes Jack a dull boy. " * (prompt_tokens // 44 + 1))[:prompt_tokens]
    arrived, got = await stream_times(client, model="bench", max_tokens=1, temperature=0.0,
                                      messages=[{"role": "user", "content": text}])
    first = got[0] if got else time.perf_counter()
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    during = [b - a for arr in arrivals for a, b in zip(arr, arr[1:]) if arrived <= b and a <= first]
    before = [b - a for arr in arrivals for a, b in zip(arr, arr[1:]) if b < arrived]
    return {"prefill_s": first - arrived, "gaps_during": len(during), "max_gap_during": max(during, default=float("nan")),
            "p50_gap_during": percentile(during, 50), "p50_gap_before": percentile(before, 50)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--streams", type=int, default=4, help="streams running while the long prompt arrives")
    ap.add_argument("--long-prompt", type=int, default=10_000, help="bytes of the long prompt (tokens on a byte model)")
    ap.add_argument("--max-prefill-tokens", type=int, default=512)
    args = ap.parse_args()

    import rwkv_gpu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the software-adapter warning
        model = rwkv_gpu.Model(args.model)
    log(f"{model!r}")
    with Server(model, max_batch=args.max_batch) as url:
        log(f"load: {args.clients} clients x {args.rounds} streamed chat completions of {args.max_tokens} tokens ...")
        r = asyncio.run(load(url, args.clients, args.rounds, args.max_tokens))
    print(f"model: {args.model}\nadapter: {model.config['adapter']} ({model.config['backend']})\n")
    print("| clients | requests | complete | req/s | tokens/s | TTFT p50 | TTFT p99 | TBT p50 | TBT p99 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.clients} | {r['requests']} | {r['complete']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
          f"{r['ttft_p50']:.3f} s | {r['ttft_p99']:.3f} s | {r['tbt_p50'] * 1e3:.1f} ms | {r['tbt_p99'] * 1e3:.1f} ms |")
    print()
    print(f"A {args.long_prompt}-token prompt arriving while {args.streams} streams run:\n")
    print("| prefill budget | prompt fed in | gaps while fed | longest gap | median gap while fed | median gap before |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, budget in ((f"{args.max_prefill_tokens} tokens/step", args.max_prefill_tokens), ("none", 1 << 30)):
        with Server(model, max_batch=args.max_batch, max_prefill_tokens=budget) as url:
            log(f"long prompt, prefill budget {label} ...")
            g = asyncio.run(long_prompt(url, args.streams, args.long_prompt))
        print(f"| {label} | {g['prefill_s']:.2f} s | {g['gaps_during']} | {g['max_gap_during'] * 1e3:.0f} ms | "
              f"{g['p50_gap_during'] * 1e3:.0f} ms | {g['p50_gap_before'] * 1e3:.0f} ms |")
    return 0 if r["complete"] == r["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
