"""`python -m rwkv_gpu.generate --model PATH "prompt"`: streams a continuation to stdout."""

from __future__ import annotations

import argparse
import sys

from . import RwkvError
from ._cli import add_model_args, add_sampling_args, load_model, reports_errors, sampling_kwargs
from .generation import MAX_TOKENS


@reports_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkv_gpu.generate", description=__doc__)
    ap.add_argument("prompt", help="the text to continue ('-' reads it from stdin)")
    add_model_args(ap)
    add_sampling_args(ap, max_tokens=MAX_TOKENS)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    args = ap.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        model = load_model(args)
        sys.stdout.write(prompt)
        for piece in model.generate(prompt, max_tokens=args.max_tokens, stop=args.stop, **sampling_kwargs(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    except RwkvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
