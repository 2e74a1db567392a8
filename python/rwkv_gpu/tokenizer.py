"""Tokenizers: the RWKV World tokenizer (Rust, shipped with its vocabulary) and, for
models that bring a tokenizer.json, a wrapper of the `tokenizers` package behind the
same interface."""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, Sequence

from . import _core

VOCAB_FILE = "rwkv_vocab_v20230424.txt"


class StreamDecoder:
    """Feed token ids one at a time; `push` returns only complete UTF-8 text (bytes that
    can never become valid come out as U+FFFD, as with errors="replace")."""

    def __init__(self, core: Any) -> None:
        self._core = core

    def push(self, token: int) -> str:
        return self._core.push(int(token))

    def finish(self) -> str:
        """Flushes an incomplete trailing character as U+FFFD and resets."""
        return self._core.finish()


class Tokenizer:
    """`Tokenizer.world()` for RWKV World models; `Tokenizer.from_file(path)` for a
    Hugging Face tokenizer.json."""

    def __init__(self, core: Any, hf: Any = None) -> None:
        self._core = core
        self._hf = hf

    @classmethod
    def world(cls) -> "Tokenizer":
        path = resources.files("rwkv_gpu") / VOCAB_FILE
        with resources.as_file(path) as p:
            return cls(_core.WorldTokenizer(os.fspath(p)))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """A tokenizer.json, through the `tokenizers` package (pip install tokenizers)."""
        try:
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError as e:
            raise _core.RwkvError("Tokenizer.from_file needs the 'tokenizers' package: pip install tokenizers") from e
        return cls(None, HfTokenizer.from_file(os.fspath(path)))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (greedy longest match over its UTF-8 bytes for World).
        Lone surrogates raise UnicodeEncodeError, as str.encode does."""
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=False).ids)
        return self._core.encode(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Several texts at once, in parallel with the GIL released."""
        if self._hf is not None:
            return [list(e.ids) for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]
        return self._core.encode_batch([t.encode("utf-8") for t in texts])

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=False).encode("utf-8")
        return self._core.decode_bytes([int(i) for i in ids])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=False)
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes | None:
        if self._hf is not None:
            piece = self._hf.id_to_token(int(token))
            return None if piece is None else piece.encode("utf-8")
        return self._core.token_bytes(int(token))

    def stream_decoder(self) -> StreamDecoder:
        if self._hf is not None:
            raise _core.RwkvError("streaming decode is available for the World tokenizer only")
        return StreamDecoder(self._core.stream_decoder())

    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return int(self._hf.get_vocab_size())
        return int(self._core.vocab_size())
