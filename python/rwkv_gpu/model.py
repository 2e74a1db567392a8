"""The public Model and State: thin typed wrappers over the Rust core (`_core`)."""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union, cast

import numpy as np

from . import _core, errors
from ._values import Tokens, int_value, token_ids
from .errors import RwkvError, ShapeError
from .generation import MAX_TOKENS, STOP_TOKENS, BatchRun, Completion, Run
from .sampling import Sampling, sampling_options
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .state_cache import StateCache

_SAMPLING = Sampling()
PathLike = Union[str, "os.PathLike[str]"]


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



def _layer_dtypes(dtype: str | None, layer_dtypes: Sequence[str] | None) -> list[str] | None:
    """None: as the file holds them (fp16 unless it is a model saved quantized). The core
    checks the names and the count."""
    if dtype is None and layer_dtypes is None:
        return None
    return [str(dtype)] if layer_dtypes is None else [str(d) for d in layer_dtypes]


def _head_dtype(quant_head: bool | None) -> str | None:
    return None if quant_head is None else "int8" if quant_head else "fp16"


class State:
    """A recurrent state: a handle to a slot of device memory. `forward` advances it in
    place. One State must not be used by two threads at once (that raises StateError);
    `clone()` gives an independent copy."""

    def __init__(self, model: Model, core: Any) -> None:
        self._model = model
        self._core = core

    def clone(self) -> State:
        return State(self._model, self._model._m.clone_state(self._core))

    # copy.copy and copy.deepcopy give a clone: two handles on one slot would advance
    # each other, and the model (held, not copied) cannot be pickled.
    def __copy__(self) -> State:
        return self.clone()

    def __deepcopy__(self, memo: dict[int, Any]) -> State:
        return self.clone()

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
        dtype: weight format of the big projections (attention receptance/key/value/
            output, ffn key/value) on the device: "fp16", "int8" (blocks of 64 with an
            fp16 scale) or "nf4" (QLoRA NormalFloat, blocks of 64 with an fp16 absmax).
            Quantized on the device at load, one tensor at a time. Low-rank matrices and
            vectors stay fp16/f32. Default: as the file holds them, which is fp16 unless
            the file is a model saved quantized (`Model.save`).
        layer_dtypes: one dtype per layer, for mixes (overrides `dtype`).
        quant_head: hold the head as int8 (True) or fp16 (False); default: as the file
            holds it (fp16 unless saved quantized).
        adapter: index or name substring from `rwkv_gpu.adapters()`; default: env
            RWKV_GPU_ADAPTER, else the best hardware adapter.
        tokenizer: "world", "bytes", a `Tokenizer`, or a tokenizer.json path; default: a
            tokenizer.json beside the checkpoint, else World for a 65536-token vocabulary
            and bytes for a 256-token one.
        initial_state: a State or a state file (ours or a state-tuning .pth) that
            `new_state()`, `generate` and `Chat` start from.
        no_f16, no_subgroups, max_binding: force the portable fallbacks (also env
            RWKV_GPU_NO_F16, RWKV_GPU_NO_SUBGROUPS, RWKV_GPU_MAX_BINDING=bytes).
        progress: called as progress(done, total) while loading; a bar on a terminal.

    Calls on one Model run one at a time; it may be shared between threads.
    """

    def __init__(
        self,
        path: PathLike,
        dtype: str | None = None,
        adapter: int | str | None = None,
        *,
        layer_dtypes: Sequence[str] | None = None,
        quant_head: bool | None = None,
        no_f16: bool = False,
        no_subgroups: bool = False,
        max_binding: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        tokenizer: str | Tokenizer | os.PathLike[str] | None = None,
        initial_state: State | PathLike | None = None,
        _core_model: Any = None,
    ) -> None:
        dtypes = _layer_dtypes(dtype, layer_dtypes)
        if _core_model is not None:
            self._m = _core_model
        else:
            fspath = os.fspath(path)
            self._m = _core.Model(
                fspath,
                adapter=None if adapter is None else str(adapter),
                no_f16=no_f16,
                no_subgroups=no_subgroups,
                max_binding=max_binding,
                progress=progress or _terminal_progress("loading"),
                layer_dtypes=dtypes,
                head_dtype=_head_dtype(quant_head),
            )
        self.dtype = self._layer_format()
        self._path = None if _core_model is not None else os.fspath(path)
        self._tokenizer_choice = tokenizer
        # Generations in progress, which close() ends (they hold the native model).
        self._live_runs: weakref.WeakSet[Any] = weakref.WeakSet()
        self._tokenizer: Tokenizer | None = None
        self._initial: State | None = None
        self._initial_version = 0
        for message in self._m.warnings():
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        if initial_state is not None:
            self.initial_state = initial_state

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
        layer_dtypes: Sequence[str] | None = None,
        quant_head: bool = False,
        no_f16: bool = False,
        no_subgroups: bool = False,
        max_binding: int | None = None,
        tokenizer: str | Tokenizer | os.PathLike[str] | None = None,
    ) -> Model:
        """A model with random weights at the official low-rank widths for `n_embd`,
        for benchmarks and tests."""
        core = _core.Model.random(
            n_layer, n_embd, vocab_size=vocab_size, seed=seed,
            adapter=None if adapter is None else str(adapter),
            no_f16=no_f16, no_subgroups=no_subgroups, max_binding=max_binding,
            layer_dtypes=_layer_dtypes(dtype, layer_dtypes), head_dtype=_head_dtype(quant_head),
        )
        return cls("<random>", tokenizer=tokenizer, _core_model=core)

    def _layer_format(self) -> str:
        """"fp16", "int8" or "nf4" when every layer's projections share one, else "mixed"
        (bf16 matrices, kept where values exceed the fp16 range, count as fp16)."""
        formats = {f for name, f in self._m.weight_formats()
                   if name.startswith("blocks.") and name.split(".", 2)[2] in _core.projections}
        formats = {"fp16" if f == "bf16" else f for f in formats}
        return formats.pop() if len(formats) == 1 else "mixed"

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

    # ---- states ----

    @property
    def state_bytes(self) -> int:
        """Device bytes of one State (f32 shift and WKV states of every layer)."""
        c = self.config
        return 4 * c["n_layer"] * (2 * c["n_embd"] + c["n_embd"] * c["head_size"])

    def new_state(self) -> State:
        """A state to start from: a copy of `initial_state` if one is set, else zeros."""
        if self._initial is not None:
            return self._initial.clone()
        return State(self, self._m.new_state())

    def new_states(self, n: int) -> list[State]:
        """`n` states for `forward_batch`, each as `new_state()` would give it. They share
        one block of device memory, which lets a batch of them read the weights once per
        step; states from separate `new_state()` calls may take one pass per block."""
        if int_value(n, "n") < 1:
            raise ShapeError(f"n must be a positive int, got {n!r}")
        states = [State(self, core) for core in self._m.new_states(n)]
        if self._initial is not None:
            for state in states:
                self._m.copy_state(self._initial._core, state._core)
        return states

    @property
    def initial_state(self) -> State | None:
        return self._initial

    @initial_state.setter
    def initial_state(self, value: State | PathLike | None) -> None:
        if value is None:
            initial = None
        elif isinstance(value, State):
            self._check_state(value)
            initial = value.clone()  # a copy: later forwards on `value` must not move it
        else:
            initial = self.load_state(value)
        self._initial = initial
        self._initial_version += 1

    def _check_state(self, state: State) -> None:
        if not isinstance(state, State):
            raise RwkvError(f"state must be a rwkv_gpu.State, got {type(state).__name__}")
        if state._model is not self:
            raise errors.StateError("this State belongs to another model")

    def _start_state(self, state: State | None) -> State:
        if state is None:
            return self.new_state()
        self._check_state(state)
        return state

    def forward(self, tokens: Tokens, state: State, all_logits: bool = False) -> np.ndarray:
        """Feeds `tokens` and advances `state` in place. Returns the last token's logits
        (np.float32 [V]) or, with all_logits, every token's ([T, V])."""
        self._check_state(state)
        ids = token_ids(tokens)
        raw = self._m.forward(ids, state._core, "all" if all_logits else "last")
        logits = np.frombuffer(raw, dtype=np.float32)
        if all_logits:
            return logits.reshape(len(ids), -1).copy()
        return logits.copy()

    def forward_batch(self, tokens: Sequence[Tokens], states: Sequence[State], all_logits: bool = False) -> np.ndarray | list[np.ndarray]:
        """Feeds several sequences at once, `tokens[i]` into `states[i]`, advancing each in
        place; the token lists may differ in length. Every step reads the weights once for
        the whole batch (when the states come from one `new_states` call), so B sequences
        cost little more than one on a GPU. Returns each sequence's last logits
        (np.float32 [B, V]) or, with all_logits, a list of [T_i, V] arrays. Nothing runs
        if any input is bad."""
        ids, cores = self._batch(tokens, states)
        raw = self._m.forward_batch(ids, cores, "all" if all_logits else "last")
        logits = np.frombuffer(raw, dtype=np.float32).reshape(-1, self.config["vocab_size"])
        if not all_logits:
            return logits.copy()
        ends = np.cumsum([len(t) for t in ids])[:-1]
        return [part.copy() for part in np.split(logits, ends)]

    def forward_argmax_batch(self, tokens: Sequence[Tokens], states: Sequence[State]) -> list[int]:
        """`forward_batch` for greedy decoding: each sequence's largest-logit id, chosen
        on the device (ties to the lowest id)."""
        ids, cores = self._batch(tokens, states)
        raw = self._m.forward_batch(ids, cores, "argmax")
        return np.frombuffer(raw, dtype=np.uint32).astype(int).tolist()

    def _batch(self, tokens: Sequence[Tokens], states: Sequence[State]) -> tuple[list[list[int]], list[Any]]:
        flat = isinstance(tokens, (str, bytes)) or (isinstance(tokens, np.ndarray) and tokens.ndim != 2)
        if flat:
            raise ShapeError("tokens must be a list of token lists, one per sequence")
        tokens, states = list(tokens), list(states)
        if len(tokens) != len(states):
            raise ShapeError(f"{len(tokens)} token lists but {len(states)} states: give one state per sequence")
        if not tokens:
            raise ShapeError("the batch is empty: give at least one sequence")
        ids = []
        for i, (t, state) in enumerate(zip(tokens, states)):
            self._check_state(state)
            try:
                ids.append(token_ids(t))
            except ShapeError as e:
                raise ShapeError(f"sequence {i}: {e}") from None
        return ids, [s._core for s in states]

    def forward_argmax(self, tokens: Tokens, state: State) -> int:
        """Feeds `tokens` like `forward` and returns the id of the last token's largest
        logit, chosen on the device (greedy decoding; 8 bytes read back instead of the
        whole vocabulary). Ties go to the lowest id, as numpy.argmax."""
        self._check_state(state)
        return int(self._m.forward_argmax(token_ids(tokens), state._core))

    def prefill(self, tokens: Tokens, state: State) -> None:
        """Advances `state` through `tokens` without computing any logits."""
        self._check_state(state)
        self._m.forward(token_ids(tokens), state._core, "none")

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
            if a.dtype.kind not in "fiu":  # complex would lose its imaginary part, text be parsed
                raise ShapeError(f"state {name} has dtype {a.dtype}; give real numbers (float32)")
            parts.append(np.ascontiguousarray(a, dtype=np.float32).tobytes())
        return State(self, self._m.state_from_host(*parts))

    def load_state(self, path: PathLike, transpose: bool = False) -> State:
        """A state saved by `State.save`, or a state-tuning file (`.pth`/`.safetensors`
        with one `blocks.{i}.att.time_state` [heads, 64, 64] per layer; shift states
        zero). Such tensors are copied as-is into the WKV state, laid out [head, value,
        key] as the official tools do; `transpose=True` for files saved [head, key, value]."""
        return State(self, self._m.load_state(os.fspath(path), transpose=transpose))

    # ---- text ----

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._pick_tokenizer()
        return self._tokenizer

    def _tokenizer_if_any(self) -> Tokenizer | None:
        """The tokenizer, or None for a vocabulary that has none (token ids only)."""
        try:
            return self.tokenizer
        except RwkvError:
            return None

    def _pick_tokenizer(self) -> Tokenizer:
        choice = self._tokenizer_choice
        vocab = self.config["vocab_size"]
        if isinstance(choice, Tokenizer):
            return choice
        if choice == "world":
            return Tokenizer.world()
        if choice == "bytes":
            return Tokenizer.byte_level()
        if choice is not None:
            return Tokenizer.from_file(choice)
        if self._path is not None:
            path = os.path.abspath(self._path)
            folder = path if os.path.isdir(path) else os.path.dirname(path)  # a Hugging Face folder holds it
            beside = os.path.join(folder, "tokenizer.json")
            if os.path.exists(beside):
                return Tokenizer.from_file(beside)
        if vocab == 256:
            return Tokenizer.byte_level()
        if vocab >= 65530:
            return Tokenizer.world()
        raise RwkvError(f"no tokenizer known for a vocabulary of {vocab}: pass tokenizer= (a Tokenizer or a tokenizer.json path)")

    def _prompt_ids(self, prompt: str | Tokens) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ShapeError("the prompt is empty")
            return ids
        return token_ids(prompt)

    def generate(
        self,
        prompt: str | Tokens,
        state: State | None = None,
        max_tokens: int = MAX_TOKENS,
        *,
        temperature: float = _SAMPLING.temperature,  # the defaults are Sampling's (one place)
        top_p: float = _SAMPLING.top_p,
        top_k: int = _SAMPLING.top_k,
        presence_penalty: float = _SAMPLING.presence_penalty,
        frequency_penalty: float = _SAMPLING.frequency_penalty,
        penalty_decay: float = _SAMPLING.penalty_decay,
        banned_tokens: Sequence[int] = _SAMPLING.banned_tokens,
        logit_bias: Mapping[int, float] | None = None,
        stop: Sequence[str] | str = (),
        stop_tokens: Sequence[int] = STOP_TOKENS,
        seed: int | None = None,
        cache: StateCache | None = None,
    ) -> Iterator[str]:
        """Streams generated text, piece by piece, each piece complete UTF-8.

        `prompt` is text or token ids; `state=None` starts from `new_state()` (the initial
        state if set), otherwise `state` is advanced in place. Sampling follows the
        official RWKV package (see `Sampling`); the defaults are the RWKV-7 chat demo's.
        Generation ends after `max_tokens` tokens, at a token in `stop_tokens` (not
        emitted, not fed) or at a stop string, found even when it spans tokens; the text
        ends before it.

        The state keeps every token that was fed: the prompt and each drawn token, the
        stop string's included (as the official chat does), so a conversation goes on
        from it without re-reading its history. Leaving the loop early (break, Ctrl-C)
        is clean: the state then holds the prompt and the tokens drawn so far.
        `cache`: a StateCache that skips the part of the prompt it has seen (state=None only).
        """
        return iter(self._run(prompt, state, max_tokens, Sampling(
            temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay,
            banned_tokens, logit_bias or {}, seed), stop, stop_tokens, cache))

    def complete(self, prompt: str | Tokens, state: State | None = None, max_tokens: int = MAX_TOKENS, **options: Any) -> Completion:
        """`generate`, collected: text, finish_reason ("stop" | "length"), token counts."""
        run = self._run(prompt, state, max_tokens, Sampling(**sampling_options(options)),
                        options.pop("stop", ()), options.pop("stop_tokens", STOP_TOKENS), options.pop("cache", None))
        text = "".join(run)
        return Completion(text, run.finish_reason or "length", run.prompt_tokens, len(run.tokens), list(run.tokens))

    def generate_batch(self, prompts: Sequence[str | Tokens], states: Sequence[State] | None = None,
                       max_tokens: int = MAX_TOKENS, **options: Any) -> Iterator[tuple[int, str]]:
        """`complete_batch`, streamed: yields (prompt index, text piece) as each sequence
        produces complete UTF-8 text; pieces of different sequences interleave step by
        step. Same options as `complete_batch`."""
        return iter(self._batch_run(prompts, states, max_tokens, options))

    def _batch_run(self, prompts: Sequence[str | Tokens], states: Sequence[State] | None, max_tokens: int,
                   options: dict[str, Any]) -> BatchRun:
        if "cache" in options:
            raise TypeError("batched generation takes no cache: give states (e.g. from StateCache.resume) instead")
        sampling = Sampling(**sampling_options(options))
        return BatchRun(self, prompts, states, max_tokens, sampling, options.pop("stop", ()), options.pop("stop_tokens", STOP_TOKENS))

    def complete_batch(self, prompts: Sequence[str | Tokens], states: Sequence[State] | None = None,
                       max_tokens: int = MAX_TOKENS, **options: Any) -> list[Completion]:
        """`complete` for several prompts at once, stepped together: every step feeds all
        sequences still going in one forward call, reading the weights once for the
        batch. Takes the same options as `complete` (stop strings and tokens apply to
        each sequence alone; with a `seed`, sequence i draws with seed + i). `states`:
        one per prompt, advanced in place as `complete` does; default fresh ones from
        `new_states`. Returns one Completion per prompt, in order."""
        return self._batch_run(prompts, states, max_tokens, options).run()

    def _run(self, prompt: str | Tokens, state: State | None, max_tokens: int, sampling: Sampling,
             stop: Sequence[str] | str, stop_tokens: Sequence[int], cache: StateCache | None) -> Run:
        return Run(self, prompt, state, max_tokens, sampling, stop, stop_tokens, cache)

    def embed(self, text_or_tokens: str | Tokens | Sequence[str | Tokens], pooling: str = "last") -> np.ndarray:
        """The final layer's normalised hidden state (the head's input) after the text,
        fed from a zero state: the last token's (`pooling="last"`) or the mean over all
        tokens ("mean"). A text or token list gives a float32 vector [n_embd]; a list of
        them gives a matrix [n, n_embd], in one call; up to 16 texts share each pass over
        the weights. Texts are fed a chunk at a time, and an Engine sharing the model
        steps between chunks, so its streams go on during a long embedding.
        Deterministic: the same call gives the same bits (a text embedded alone or beside
        others agrees to float rounding, ~1e-7).

        This is a representation of the text as the language model sees it, not a
        trained sentence-embedding model: compare such vectors with care."""
        single = isinstance(text_or_tokens, str) or (
            isinstance(text_or_tokens, np.ndarray) and text_or_tokens.ndim == 1
        ) or (isinstance(text_or_tokens, Sequence) and len(text_or_tokens) > 0
              and all(isinstance(t, (int, np.integer)) for t in text_or_tokens))
        items = cast("list[str | Tokens]", [text_or_tokens] if single else list(text_or_tokens))
        if not items:
            raise ShapeError("embed needs at least one text")
        batch = [self._prompt_ids(x) for x in items]
        raw = self._m.embed(batch, pooling)
        rows = np.frombuffer(raw, dtype=np.float32).reshape(len(batch), -1).copy()
        return rows[0] if single else rows

    def memory(self) -> dict[str, int]:
        """Device bytes held by this model, by category: weights_fp16 / weights_int8 /
        weights_nf4 (layer matrices by format), weights_f32 (vectors), head, embeddings
        (0: the table stays in host memory, each call uploads its tokens' rows), states
        (every allocated slot) and scratch (activations, sized for one prefill chunk)."""
        return dict(self._m.memory())

    def host_memory(self) -> dict[str, int]:
        """Host bytes of the tables kept in host memory: embeddings (the embedding table),
        deep_embed (RWKV-7a's per-layer tables; quantization leaves them as the file holds
        them), and mapped: how many of those bytes are read from the checkpoint file's
        memory mapping (paged in as rows are used) rather than copied."""
        return dict(self._m.host_memory())

    def save(self, path: PathLike) -> None:
        """Writes the model as it is held on the device to a `.safetensors` file:
        official tensor names, quantized matrices as `NAME.codes` + `NAME.scales` with
        their format in the metadata. `Model(path)` loads it without quantizing again,
        in the saved formats. Written to a temporary file, then renamed."""
        self._m.save(os.fspath(path))

    def weight_formats(self) -> dict[str, str]:
        """The format each matrix is held in ("fp16", "bf16", "int8", "nf4")."""
        return dict(self._m.weight_formats())

    def close(self) -> None:
        """Releases the device memory; the Model cannot be used afterwards. Generations
        still being iterated end (finish_reason "closed") and let go of the model."""
        for run in list(self.__dict__.get("_live_runs", ())):
            run._close()
        self.__dict__["_core"] = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.__dict__.get("_core") is None:
            return "<rwkv_gpu.Model closed>"
        c = self.config
        return f"<rwkv_gpu.Model L{c['n_layer']} C{c['n_embd']} V{c['vocab_size']} {self.dtype} on {c['adapter']} ({c['backend']})>"
