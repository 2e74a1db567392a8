"""`python -m rwkv_gpu.chat --model PATH`: an interactive chat on the terminal.

Type a message and press Enter. Ctrl-C stops a reply; Ctrl-D (or /quit) leaves;
/reset starts the conversation over; /save PATH saves the state.
"""

from __future__ import annotations

import argparse
import sys

from . import RwkvError
from ._cli import add_model_args, add_sampling_args, load_model, reports_errors, sampling_kwargs
from .conversation import Chat


@reports_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkv_gpu.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_sampling_args(ap, max_tokens=1024)
    ap.add_argument("--system", help="system prompt, fed once at the start")
    args = ap.parse_args(argv)
    try:
        model = load_model(args)
    except RwkvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    def new_chat() -> Chat:
        return Chat(model, system=args.system, max_tokens=args.max_tokens, **sampling_kwargs(args))

    chat = new_chat()
    print(f"{model!r}\n/quit, /reset, /save PATH; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            message = input("User: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = message.strip()
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            chat = new_chat()
            continue
        if command.startswith("/save "):
            try:
                chat.state.save(command[6:].strip())
            except RwkvError as e:  # a bad path ends nothing: say so and go on
                print(f"error: {e}", file=sys.stderr)
            continue
        if not command:
            continue
        sys.stdout.write("Assistant: ")
        try:
            for piece in chat.send(message):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except RwkvError as e:
            print(f"\nerror: {e}", file=sys.stderr)
        sys.stdout.write("\n\n")


if __name__ == "__main__":
    sys.exit(main())
