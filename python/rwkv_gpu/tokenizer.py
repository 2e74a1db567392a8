"""Tokenizers: the RWKV World tokenizer (Rust, shipped with its vocabulary), a byte-level
one (token id = byte value, for byte models such as tests/data/trained-bytes) and, for
models that bring a tokenizer.json, a wrapper of the `tokenizers` package, all behind
the same interface."""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from . import _core, errors
from ._values import int_values

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
# The core's bound on side files (src/loader/folder.rs); big vocabularies' tokenizer.json
# files are about 10 MB.
MAX_TOKENIZER_JSON_BYTES = 64 << 20


class StreamDecoder:
    """Feed token ids one at a time; `push` returns only complete UTF-8 text (bytes that
    can never become valid come out as U+FFFD, as with errors="replace")."""

    def __init__(self, core: Any) -> None:
        self._core = core  # anything with push(int) -> str and finish() -> str

    def push(self, token: int) -> str:
        return self._core.push(int(token))

    def finish(self) -> str:
        """Flushes an incomplete trailing character as U+FFFD and resets."""
        return self._core.finish()


def _out_of_range(token: int, vocab: int, position: int | None = None) -> errors.ShapeError:
    """The core's wording of an id outside the vocabulary (`Error::token_out_of_range`),
    for the tokenizers that live here: byte-level and tokenizer.json."""
    at = "" if position is None else f" at position {position}"
    return errors.ShapeError(f"token id {token}{at} is out of range: the vocabulary has {vocab} tokens")


def _checked_ids(ids: Sequence[int], vocab: int) -> list[int]:
    """`ids` as ints, each in 0..vocab (the `tokenizers` package would drop unknown ids
    silently and refuse negative ones with a bare OverflowError)."""
    values = int_values(ids, "token ids")
    for position, token in enumerate(values):
        if not 0 <= token < vocab:
            raise _out_of_range(token, vocab, position)
    return values


class _ByteStream:
    """Stream decoding for byte tokens: an incremental UTF-8 decoder."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        if not 0 <= token < 256:
            raise _out_of_range(token, 256)
        return self._utf8.decode(bytes([token]))

    def finish(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


class _PrefixStream:
    """Stream decoding for tokenizers whose pieces are not raw bytes (tokenizer.json):
    decode a short window that starts one emitted piece back, so that merges and leading
    spaces come out as in a full decode, and emit only text that does not end in a
    replacement character (an incomplete character)."""

    def __init__(self, decode: Callable[[list[int]], str], vocab: int) -> None:
        self._decode = decode
        self._vocab = vocab
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already emitted

    def push(self, token: int) -> str:
        if not 0 <= token < self._vocab:
            raise _out_of_range(token, self._vocab)  # before anything changes
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]

    def finish(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(before) :]


def _read_tokenizer_json(path: str) -> str:
    """The file's text, looked at before it is opened: a FIFO would block the read and a
    huge file is no tokenizer."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise errors.ModelLoadError(f"{path}: not a regular file")
        if st.st_size > MAX_TOKENIZER_JSON_BYTES:
            raise errors.ModelLoadError(
                f"{path}: {st.st_size} bytes: too big for a tokenizer.json (at most {MAX_TOKENIZER_JSON_BYTES})")
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise errors.ModelNotFoundError(e.errno, e.strerror, path) from None
    except PermissionError as e:
        raise errors.ModelPermissionError(e.errno, e.strerror, path) from None
    except OSError as e:
        raise errors.ModelLoadError(f"{path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.ModelLoadError(f"{path}: not UTF-8: {e}") from None


class Tokenizer:
    """`Tokenizer.world()` for RWKV World models, `Tokenizer.byte_level()` for byte-level
    models, `Tokenizer.from_file(path)` for a Hugging Face tokenizer.json."""

    def __init__(self, core: Any, hf: Any = None, *, byte_level: bool = False) -> None:
        self._core = core
        self._hf = hf
        self._bytes = byte_level

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """Token id = byte value (vocabulary 256)."""
        return cls(None, byte_level=True)

    @classmethod
    def world(cls) -> Tokenizer:
        path = resources.files("rwkv_gpu") / VOCAB_FILE
        with resources.as_file(path) as p:
            return cls(_core.WorldTokenizer(os.fspath(p)))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A tokenizer.json, through the `tokenizers` package (pip install tokenizers).
        A file that is missing, not a regular file, too big or not one the package
        reads raises ModelLoadError (or its FileNotFoundError/PermissionError kinds)
        naming it."""
        try:
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError as e:
            raise errors.RwkvError("Tokenizer.from_file needs the 'tokenizers' package: pip install tokenizers") from e
        path = os.fspath(path)
        text = _read_tokenizer_json(path)
        try:
            return cls(None, HfTokenizer.from_str(text))
        except Exception as e:  # the package raises a bare Exception for what it cannot parse
            raise errors.ModelLoadError(f"{path}: not a tokenizer.json the tokenizers package reads: {e}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (greedy longest match over its UTF-8 bytes for World).
        Lone surrogates raise UnicodeEncodeError, as str.encode does."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a string, got {type(text).__name__}")
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=False).ids)
        if self._bytes:
            return list(text.encode("utf-8"))
        return self._core.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Several texts at once, in parallel with the GIL released."""
        if self._hf is not None:
            return [list(e.ids) for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]
        if self._bytes:
            return [list(t.encode("utf-8")) for t in texts]
        return self._core.encode_batch(list(texts))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if self._hf is not None:
            return self.decode(ids).encode("utf-8")
        if self._bytes:
            return bytes(_checked_ids(ids, 256))
        return self._core.decode_bytes(int_values(ids, "token ids"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        if self._hf is not None:
            return self._hf.decode(_checked_ids(ids, self.vocab_size), skip_special_tokens=False)
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes | None:
        token = int(token)
        if not 0 <= token < 2**32:  # no tokenizer has such an id
            return None
        if self._hf is not None:
            piece = self._hf.id_to_token(token)
            return None if piece is None else piece.encode("utf-8")
        if self._bytes:
            return bytes([token]) if 0 <= token < 256 else None
        return self._core.token_bytes(token)

    def stream_decoder(self) -> StreamDecoder:
        if self._hf is not None:
            hf = self._hf
            return StreamDecoder(_PrefixStream(lambda ids: hf.decode(ids, skip_special_tokens=False), self.vocab_size))
        if self._bytes:
            return StreamDecoder(_ByteStream())
        return StreamDecoder(self._core.stream_decoder())

    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return int(self._hf.get_vocab_size())
        if self._bytes:
            return 256
        return int(self._core.vocab_size())
