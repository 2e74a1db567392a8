"""The World tokenizer: the official ids on the golden cases and, as a property test,
on random and adversarial texts against the official pure-Python TRIE_TOKENIZER
(`pip install rwkv --no-deps`; it imports nothing else)."""

from __future__ import annotations

import json
import os
import random
import re
from importlib import resources

import pytest
import rwkv_gpu
from conftest import DATA, without_blocking


@pytest.fixture(scope="module")
def world():
    return rwkv_gpu.Tokenizer.world()


@pytest.fixture(scope="module")
def official():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    with resources.as_file(resources.files("rwkv_gpu") / "rwkv_vocab_v20230424.txt") as p:
        return TRIE_TOKENIZER(str(p))


def test_golden_cases(world):
    cases = json.loads((DATA / "tokenizer_cases.json").read_text(encoding="utf-8"))
    assert cases
    for case in cases:
        assert world.encode(case["text"]) == case["ids"], case["text"]
        assert world.decode(case["ids"]) == case["text"]


def random_text(rng: random.Random) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789",
        " \t\n\r\x00\x01\x1b\x7f\x85\xa0",
        "的一是不了人我在有他这为之大来以个中上们",
        "こんにちはカタカナ한국어Ελληνικάкириллица",
        "😀👍🏽👨‍👩‍👧🇫🇷🧑🏿‍🚀\ufe0f\u200d",
        "éèêëàâäôöûüçñ\u0301\u0308",
        "\U0001d54f\U00010348\uffff\ue000\ufeff",
        "def f(x):\n    return x ** 2  # comment\n",
    ]
    parts = []
    for _ in range(rng.randint(1, 12)):
        pool = rng.choice(pools)
        if rng.random() < 0.1:
            parts.append(rng.choice(pool) * rng.randint(50, 300))  # long runs
        else:
            parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 30))))
    return "".join(parts)


def test_matches_official_on_random_texts(world, official):
    rng = random.Random(1234)
    texts = [random_text(rng) for _ in range(1500)]
    for text in texts:
        assert world.encode(text) == official.encode(text), repr(text)
    assert world.encode_batch(texts) == [official.encode(t) for t in texts]


def test_round_trip_and_invalid_surrogates(world):
    text = "mixed 文字 and emoji 😀\n"
    assert world.decode(world.encode(text)) == text
    # A lone surrogate cannot be UTF-8 encoded: Python's own rule applies.
    with pytest.raises(UnicodeEncodeError):
        world.encode("a\ud800b")


def test_stream_decoder_never_yields_half_a_character(world):
    emoji = "👍🏽"
    byte_ids = [tid for tid in range(1, 257) if world.token_bytes(tid) is not None and len(world.token_bytes(tid)) == 1]
    by_byte = {world.token_bytes(t)[0]: t for t in byte_ids}
    stream = world.stream_decoder()
    pieces = [stream.push(by_byte[b]) for b in emoji.encode("utf-8")]
    pieces.append(stream.finish())
    assert "".join(pieces) == emoji
    assert all(p in ("", "👍", "🏽", emoji) for p in pieces), pieces


@pytest.mark.parametrize("which", ["world", "bytes", "tokenizer.json"])
def test_bad_ids(world, which, request):
    # One wording for every tokenizer (and the model): the id, its position, the vocabulary.
    # (The `tokenizers` package alone would drop 70000 silently and raise OverflowError at -1.)
    tok = {"world": lambda: world, "bytes": rwkv_gpu.Tokenizer.byte_level,
           "tokenizer.json": lambda: rwkv_gpu.Tokenizer.from_file(request.getfixturevalue("bpe_json"))}[which]()
    vocab = tok.vocab_size
    for bad in (70000, -1, 2**40):
        for call in (tok.decode, tok.decode_bytes):
            with pytest.raises(rwkv_gpu.ShapeError,
                               match=f"^token id {bad} at position 1 is out of range: the vocabulary has {vocab} tokens$"):
                call([5, bad, 6])
        stream = tok.stream_decoder()
        first = stream.push(tok.encode("a")[0])
        with pytest.raises(rwkv_gpu.ShapeError, match=f"^token id {bad} is out of range: the vocabulary has {vocab} tokens$"):
            stream.push(bad)
        # A refused id changes nothing: the stream goes on as if it had never been pushed.
        assert first + stream.push(tok.encode("b")[0]) + stream.finish() == "ab"
    # No token has an id outside 0..2**32: None, as for any id without a token.
    assert world.token_bytes(-1) is None and world.token_bytes(2**40) is None


# ---- tokenizer.json models, through the `tokenizers` package ----

@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    """A small byte-level BPE tokenizer.json trained here (no file to ship)."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["def main():\n    return 0\n", "import numpy as np\n", "héllo wörld 😀 " * 3] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_json_round_trips_and_streams(bpe_json):
    tok = rwkv_gpu.Tokenizer.from_file(bpe_json)
    text = "def main():\n    print('héllo 😀 wörld')\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "np"]) == [ids, tok.encode("np")]
    d = tok.stream_decoder()
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) + d.finish() == text
    assert all("\ufffd" not in p for p in pieces)
    assert tok.token_bytes(ids[0]) and tok.token_bytes(-1) is None and tok.token_bytes(2**40) is None


def test_a_bad_tokenizer_json_is_a_load_error_naming_it(tmp_path):
    """Missing, a folder, a FIFO (opening one would block: a regression fails
    `without_blocking` instead of hanging), not UTF-8, not a tokenizer: each a ModelLoadError (the
    missing one also a FileNotFoundError) naming the path, not the package's bare Exception."""
    path = tmp_path / "tokenizer.json"
    with pytest.raises(rwkv_gpu.ModelNotFoundError) as missing:
        rwkv_gpu.Tokenizer.from_file(path)
    assert isinstance(missing.value, FileNotFoundError) and missing.value.filename == str(path)
    path.mkdir()
    with pytest.raises(rwkv_gpu.ModelLoadError, match=f"^{re.escape(str(path))}: not a regular file$"):
        rwkv_gpu.Tokenizer.from_file(path)
    path.rmdir()
    os.mkfifo(path)
    with pytest.raises(rwkv_gpu.ModelLoadError, match=f"^{re.escape(str(path))}: not a regular file$"):
        without_blocking(lambda: rwkv_gpu.Tokenizer.from_file(path), seconds=60)
    path.unlink()
    for content, says in ((b"\xff\xfe", "not UTF-8"), (b'{"model": 3}', "not a tokenizer.json the tokenizers package reads")):
        path.write_bytes(content)
        with pytest.raises(rwkv_gpu.ModelLoadError, match=f"^{re.escape(str(path))}: {says}"):
            rwkv_gpu.Tokenizer.from_file(path)


def test_model_picks_the_tokenizer_json_beside_it(bpe_json, tmp_path):
    import shutil

    from conftest import open_model

    shutil.copy(DATA / "tiny-rwkv7" / "model.safetensors", tmp_path / "model.safetensors")  # vocab 512
    shutil.copy(bpe_json, tmp_path / "tokenizer.json")
    m = open_model(tmp_path / "model.safetensors")
    assert m.tokenizer.vocab_size == rwkv_gpu.Tokenizer.from_file(bpe_json).vocab_size
    r = m.complete("def ", max_tokens=3, temperature=0.0)
    # The model's ids past the tokenizer's 300 have no text: generation bans them.
    assert r.completion_tokens == 3 and all(t < m.tokenizer.vocab_size for t in r.tokens)
    assert r.text == m.tokenizer.decode(r.tokens)
