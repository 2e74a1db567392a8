"""The public Model and State: thin typed wrappers over the Rust core (`_core`)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, Sequence, Union

import numpy as np

from . import _core
from ._core import RwkvError, ShapeError

Tokens = Union[Sequence[int], np.ndarray]
PathLike = Union[str, "os.PathLike[str]"]


def _token_list(tokens: Tokens) -> list[int]:
    """Accepts a list of ints or a 1-D integer array; rejects anything else by name."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ShapeError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
        out = tokens.astype(np.int64).tolist()
    elif isinstance(tokens, (str, bytes)):
        raise ShapeError("tokens must be token ids, not text (encode it with a tokenizer first)")
    else:
        try:
            out = [int(t) for t in tokens]
        except (TypeError, ValueError) as e:
            raise ShapeError(f"tokens must be a sequence of ints: {e}") from None
        if any(not isinstance(t, (int, np.integer)) or isinstance(t, bool) for t in tokens):
            raise ShapeError("tokens must be ints")
    if not out:
        raise ShapeError("tokens is empty: give at least one token id")
    return out


def _terminal_progress(label: str) -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


class State:
    """A recurrent state: a handle to a slot of device memory. `forward` advances it in
    place. One State must not be used by two threads at once (that raises StateError);
    `clone()` gives an independent copy."""

    def __init__(self, model: "Model", core: Any) -> None:
        self._model = model
        self._core = core

    def clone(self) -> "State":
        return State(self._model, self._model._m.clone_state(self._core))

    def to_numpy(self) -> dict[str, np.ndarray]:
        """{"att_shift": [L, C], "wkv": [L, H, N, N], "ffn_shift": [L, C]}, float32; wkv is
        indexed [layer, head, value, key] as in the official package."""
        cfg = self._model.config
        L, C, H, N = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["head_size"]
        att, wkv, ffn = self._model._m.state_to_host(self._core)
        return {
            "att_shift": np.frombuffer(att, dtype=np.float32).reshape(L, C).copy(),
            "wkv": np.frombuffer(wkv, dtype=np.float32).reshape(L, H, N, N).copy(),
            "ffn_shift": np.frombuffer(ffn, dtype=np.float32).reshape(L, C).copy(),
        }

    def save(self, path: PathLike) -> None:
        """Writes a safetensors file with the model's dimensions and weight fingerprint."""
        self._model._m.save_state(self._core, os.fspath(path))


class Model:
    """An RWKV-7 model on a GPU.

    Args:
        path: an official `.pth` or a `.safetensors` checkpoint (bf16, fp16 or fp32).
        dtype: weight format on the device; "fp16" for now.
        adapter: index or name substring from `rwkv_gpu.adapters()`; default: env
            RWKV_GPU_ADAPTER, else the best hardware adapter.
        no_f16, no_subgroups, max_binding: force the portable fallbacks (also env
            RWKV_GPU_NO_F16, RWKV_GPU_NO_SUBGROUPS, RWKV_GPU_MAX_BINDING=bytes).
        progress: called as progress(done, total) while loading; a bar on a terminal.

    Calls on one Model run one at a time; it may be shared between threads.
    """

    def __init__(
        self,
        path: PathLike,
        dtype: str = "fp16",
        adapter: int | str | None = None,
        *,
        no_f16: bool = False,
        no_subgroups: bool = False,
        max_binding: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        _core_model: Any = None,
    ) -> None:
        if dtype != "fp16":
            raise RwkvError(f"dtype {dtype!r} is not supported yet; use 'fp16'")
        if _core_model is not None:
            self._m = _core_model
        else:
            fspath = os.fspath(path)
            if not os.path.exists(fspath):
                raise _core.ModelLoadError(f"{fspath}: no such file")
            self._m = _core.Model(
                fspath,
                adapter=None if adapter is None else str(adapter),
                no_f16=no_f16,
                no_subgroups=no_subgroups,
                max_binding=max_binding,
                progress=progress or _terminal_progress("loading"),
            )
        self.dtype = dtype
        for message in self._m.warnings():
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    @classmethod
    def random(
        cls,
        n_layer: int,
        n_embd: int,
        vocab_size: int = 65536,
        dtype: str = "fp16",
        seed: int = 0,
        adapter: int | str | None = None,
        *,
        no_f16: bool = False,
        no_subgroups: bool = False,
        max_binding: int | None = None,
    ) -> "Model":
        """A model with random weights at the official low-rank widths for `n_embd`,
        for benchmarks and tests."""
        core = _core.Model.random(
            n_layer, n_embd, vocab_size=vocab_size, seed=seed,
            adapter=None if adapter is None else str(adapter),
            no_f16=no_f16, no_subgroups=no_subgroups, max_binding=max_binding,
        )
        return cls("<random>", dtype=dtype, _core_model=core)

    @property
    def _m(self) -> Any:
        core = self.__dict__.get("_core")
        if core is None:
            raise RwkvError("this Model is closed")
        return core

    @_m.setter
    def _m(self, core: Any) -> None:
        self.__dict__["_core"] = core

    @property
    def config(self) -> dict[str, Any]:
        cfg = self._m.config()
        cfg["dtype"] = self.dtype
        return cfg

    def new_state(self) -> State:
        return State(self, self._m.new_state())

    def _check_state(self, state: State) -> None:
        if not isinstance(state, State):
            raise RwkvError(f"state must be a rwkv_gpu.State, got {type(state).__name__}")

    def forward(self, tokens: Tokens, state: State, all_logits: bool = False) -> np.ndarray:
        """Feeds `tokens` and advances `state` in place. Returns the last token's logits
        (np.float32 [V]) or, with all_logits, every token's ([T, V])."""
        self._check_state(state)
        ids = _token_list(tokens)
        raw = self._m.forward(ids, state._core, "all" if all_logits else "last")
        logits = np.frombuffer(raw, dtype=np.float32)
        if all_logits:
            return logits.reshape(len(ids), -1).copy()
        return logits.copy()

    def prefill(self, tokens: Tokens, state: State) -> None:
        """Advances `state` through `tokens` without computing any logits."""
        self._check_state(state)
        self._m.forward(_token_list(tokens), state._core, "none")

    def state_from_numpy(self, arrays: dict[str, np.ndarray]) -> State:
        cfg = self.config
        L, C, H, N = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["head_size"]
        shapes = {"att_shift": (L, C), "wkv": (L, H, N, N), "ffn_shift": (L, C)}
        parts = []
        for name, shape in shapes.items():
            if name not in arrays:
                raise ShapeError(f"state dict is missing {name!r} (needs att_shift, wkv, ffn_shift)")
            a = np.asarray(arrays[name])
            if a.shape != shape:
                raise ShapeError(f"state {name} has shape {a.shape}; this model needs {shape}")
            parts.append(np.ascontiguousarray(a, dtype=np.float32).tobytes())
        return State(self, self._m.state_from_host(*parts))

    def load_state(self, path: PathLike) -> State:
        return State(self, self._m.load_state(os.fspath(path)))

    def memory(self) -> dict[str, int]:
        """Device bytes held by this model, by category."""
        return dict(self._m.memory())

    def close(self) -> None:
        """Releases the device memory; the Model cannot be used afterwards."""
        self.__dict__["_core"] = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.__dict__.get("_core") is None:
            return "<rwkv_gpu.Model closed>"
        c = self.config
        return f"<rwkv_gpu.Model L{c['n_layer']} C{c['n_embd']} V{c['vocab_size']} {self.dtype} on {c['adapter']} ({c['backend']})>"
