"""Command-line pieces shared by the `python -m rwkv_gpu.*` commands (generate, chat,
bench, quantize)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from .errors import RwkvError
from .model import Model
from .sampling import Sampling

_DEFAULTS = Sampling()


def reports_errors(main: Callable[..., int]) -> Callable[..., int]:
    """A command's `main` that prints one `error: ...` line and returns 1 for an rwkv-gpu
    or OS error (a missing file, a bad option), and 130 on Ctrl-C, never a traceback."""

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        except (RwkvError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="checkpoint (.pth or .safetensors)")
    ap.add_argument("--adapter", help="adapter index or name substring (see rwkv_gpu.adapters())")
    ap.add_argument("--tokenizer", help="'world', 'bytes' or a tokenizer.json (default: chosen from the model)")
    ap.add_argument("--state", help="initial state: a saved state or a state-tuning file")
    ap.add_argument("--transpose-state", action="store_true", help="the state-tuning file is [head, key, value]")


def add_sampling_args(ap: argparse.ArgumentParser, max_tokens: int) -> None:
    g = ap.add_argument_group("sampling (defaults: the official RWKV-7 chat demo's)")
    g.add_argument("-n", "--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=_DEFAULTS.temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=_DEFAULTS.top_p)
    g.add_argument("--top-k", type=int, default=_DEFAULTS.top_k, help="0 = off")
    g.add_argument("--presence-penalty", type=float, default=_DEFAULTS.presence_penalty)
    g.add_argument("--frequency-penalty", type=float, default=_DEFAULTS.frequency_penalty)
    g.add_argument("--penalty-decay", type=float, default=_DEFAULTS.penalty_decay)
    g.add_argument("--seed", type=int, help="same seed, same text (on the same device and build)")


def load_model(args: argparse.Namespace) -> Model:
    model = Model(args.model, dtype=getattr(args, "dtype", None), adapter=args.adapter, tokenizer=args.tokenizer)
    if args.state:
        model.initial_state = model.load_state(args.state, transpose=args.transpose_state)
    return model


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "penalty_decay": args.penalty_decay,
        "seed": args.seed,
    }


def add_quant_args(ap: argparse.ArgumentParser) -> None:
    """The weight-format flags other RWKV benches use."""
    g = ap.add_argument_group("weight formats (default: as the file holds them; fp16 for a checkpoint)")
    g.add_argument("--dtype", choices=("fp16", "int8", "nf4"), help="format of every layer's projections")
    g.add_argument("--quant", type=int, default=0, metavar="N", help="the first N layers int8")
    g.add_argument("--quant-nf4", type=int, default=0, metavar="M", help="the first M layers nf4 (wins over --quant)")
    g.add_argument("--quant-head", action="store_true", default=None, help="the head int8 too")


def quant_layer_dtypes(args: argparse.Namespace, n_layer: int) -> list[str] | None:
    """One dtype per layer from the flags, or None when none was given."""
    if args.dtype is None and not args.quant and not args.quant_nf4:
        return None
    rest = args.dtype or "fp16"
    return ["nf4" if i < args.quant_nf4 else "int8" if i < args.quant else rest for i in range(n_layer)]
