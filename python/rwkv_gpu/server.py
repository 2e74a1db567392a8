"""The OpenAI-compatible HTTP API over an Engine (FastAPI; streams as server-sent events).

`create_app(engine, ...)` builds the ASGI app; `python -m rwkv_gpu.serve` runs it on
uvicorn. Requests and answers follow the OpenAI API's shapes, so its clients work
unchanged; `top_k` and `penalty_decay` are RWKV extras. Sampling options a request leaves
out take rwkv-gpu's defaults (`rwkv_gpu.Sampling`, the RWKV-7 chat demo's), not OpenAI's.

Chat turns use the RWKV-7 chat format (`rwkv_gpu.conversation`). Each message is
tokenized on its own, so the state after any leading run of messages is a prefix-cache
entry that later requests with the same start reuse. `/v1/responses` keeps each
response's final state (bounded in bytes, oldest out): `previous_response_id` continues
from it and feeds only the new input.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import json
import logging
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import _core, errors
from .conversation import REPLY_PROMPT, REPLY_STOP, ReplyStart, turn
from .metrics import Metrics
from .sampling import item_seed

if TYPE_CHECKING:
    from .engine import Engine
    from .engine import Request as EngineRequest
    from .model import State


class ApiError(Exception):
    """An error answered in the OpenAI format: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _from_rwkv(e: BaseException) -> ApiError:
    """The HTTP answer for an error of the runtime."""
    if isinstance(e, (errors.InvalidOptionError, errors.ShapeError)):
        return ApiError(400, str(e))
    if isinstance(e, errors.QueueFullError):
        return ApiError(429, str(e), "rate_limit_error", code="queue_full")
    if isinstance(e, (errors.DeviceLostError, errors.EngineClosedError)):
        return ApiError(503, str(e), "server_error", code="unavailable")
    if isinstance(e, errors.OutOfMemoryError):
        return ApiError(503, str(e), "server_error", code="out_of_memory")
    return ApiError(500, f"{type(e).__name__}: {e}", "server_error")


# ---- request bodies ----

# Stop strings are matched against every drawn token on the scheduler's thread, so their
# number and length are bounded (OpenAI takes at most 4).
MAX_STOPS = 16
# Log-probabilities one request may ask for: n x max tokens x (1 + alternatives). An entry
# is about 50 bytes of JSON, so an answer stays within about 25 MB (16 choices x 8192
# tokens x 21 would be 2.8M entries, about 140 MB built and sent for one request).
MAX_LOGPROB_ENTRIES = 1 << 19
MAX_STOP_CHARS = 256
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None

T = TypeVar("T")
log = logging.getLogger("rwkv_gpu.server")

# A request body may hold this many bytes per prompt token the server takes (JSON text
# of any script, or token ids, fits with room to spare); a bigger one is refused unread.
BODY_BYTES_PER_TOKEN = 64


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before it is parsed or
    tokenized, by its Content-Length or, without one, as soon as that many bytes came."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the request body is over {self.max_bytes} bytes, the most this server reads"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await ApiError(413, self._message()).response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised where the app reads the body: its HTTP error handler answers.
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)


class _Sampled(BaseModel):
    """The sampling fields every generating endpoint takes (one place for their bounds).
    Fields of the OpenAI API this server does not act on (user, service_tier, ...) are
    accepted and ignored, as clients send them; those it cannot honour (tools, a JSON
    response format) are refused by `check_unsupported`."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1 << 31)
    presence_penalty: float | None = Field(None, ge=-100.0, le=100.0)
    frequency_penalty: float | None = Field(None, ge=-100.0, le=100.0)
    penalty_decay: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    # Token id (as text, as OpenAI's) -> added to its logit; -100 bans it in practice.
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(None, max_length=1024)


class _Body(_Sampled):
    stop: Stop = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=_core.max_top_logprobs)
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=_core.max_top_logprobs)


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"


class ResponseBody(_Sampled):
    input: str | list[Message]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    store: bool = True
    stream: bool = False


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
            raise ApiError(400, f"unsupported content part of type {part.get('type')!r}: this model reads text only",
                           param="messages")
        parts.append(part["text"])
    return "".join(parts)


@dataclass
class _Stored:
    state: State
    created: float


class ResponseStore:
    """Final states of `/v1/responses` answers by id, bounded in device bytes, the
    oldest out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, _Stored] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def put(self, key: str, state: State) -> None:
        with self._lock:
            if state._model.state_bytes > self.max_bytes:
                return
            self._items[key] = _Stored(state, time.time())
            while len(self._items) * state._model.state_bytes > self.max_bytes:
                self._items.popitem(last=False)
                self.evicted += 1

    def get(self, key: str) -> State | None:
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item.state

    def __len__(self) -> int:
        return len(self._items)


def nginx_route(key: str, servers: int) -> int:
    """Which of `servers` equal-weight servers (in the config's order) nginx's
    `hash $key;` picks for `key`: its hash is documented as Cache::Memcached-compatible,
    ((crc32(key) >> 16) & 0x7fff) mod the total weight (ngx_http_upstream_hash_module.c)."""
    return ((zlib.crc32(key.encode()) >> 16) & 0x7FFF) % servers


def response_id(route: tuple[int, int] | None) -> str:
    """A new response id; with route (index, servers), one that nginx's hash sends back to
    server `index`, so that `previous_response_id` reaches the server holding its state."""
    while True:
        rid = f"resp_{uuid.uuid4().hex}"
        if route is None or nginx_route(rid, route[1]) == route[0]:
            return rid


# ---- the app ----

def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_prompt_tokens: int = 65536,
               max_output_tokens: int = 8192, response_store_bytes: int = 1 << 30,
               route: tuple[int, int] | None = None) -> FastAPI:
    """The ASGI app serving `engine`'s model as `model_name`. Prompts longer than
    `max_prompt_tokens` get 413 (and bodies over BODY_BYTES_PER_TOKEN bytes per such token,
    1 MiB at least, before they are read), asking for more than `max_output_tokens` gets 400.
    `route` (index, servers): this server's place behind nginx (`response_id`)."""
    if route is not None and not 0 <= route[0] < route[1]:
        raise errors.InvalidOptionError(f"route index {route[0]} must be in 0..{route[1] - 1}")
    model = engine.model
    tokenizer = model.tokenizer
    vocab_size = model.config["vocab_size"]
    responses = ResponseStore(response_store_bytes)
    metrics = Metrics(engine, responses)
    app = FastAPI(title="rwkv-gpu", version="0.1.0", description="OpenAI-compatible API for RWKV-7 models on the GPU")
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ())[1:]]
        # The parameter is the body's field; the rest of the place (a list index, the
        # member of a union pydantic tried) goes in the message only.
        where = ".".join(loc) or "body"
        message = f"invalid request: {where}: {first.get('msg', 'malformed')}"
        if "json" not in request.headers.get("content-type", ""):  # curl -d sends form encoding
            message += " (send the body as JSON, with Content-Type: application/json)"
        return ApiError(400, message, param=loc[0] if loc else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error").response()

    @app.exception_handler(errors.RwkvError)
    async def runtime_error(_: Request, e: errors.RwkvError) -> JSONResponse:
        return _from_rwkv(e).response()

    # Added first, so it runs inside `authorize`: a stranger learns nothing of the limit.
    app.add_middleware(BodyLimit, max_bytes=max(1 << 20, BODY_BYTES_PER_TOKEN * max_prompt_tokens))

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if api_key is not None and path.startswith("/v1/"):
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            # The scheme is case-insensitive (RFC 9110); the key is compared in constant time.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                metrics.http(path, 401)
                return ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                code="invalid_api_key").response()
        try:
            response = await call_next(request)
        except Exception:  # a bug of ours: an OpenAI-format 500, counted, and logged
            log.exception("unhandled error answering %s %s", request.method, path)
            response = ApiError(500, "internal server error (the server's log has the details)", "server_error").response()
        metrics.http(path, response.status_code)
        return response

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")

    def check_length(ids: Sequence[int], param: str) -> None:
        if len(ids) > max_prompt_tokens:
            raise ApiError(413, f"the prompt has {len(ids)} tokens; this server takes at most {max_prompt_tokens}",
                           param=param, code="context_length_exceeded")

    def output_limit(asked: int | None, default: int, param: str) -> int:
        n = min(default, max_output_tokens) if asked is None else asked
        if n > max_output_tokens:
            raise ApiError(400, f"{param} is {n}; this server generates at most {max_output_tokens} tokens per request",
                           param=param)
        return n

    def check_logprobs(n: int, max_tokens: int, top: int | None, param: str) -> None:
        if top is None:
            return
        entries = n * max_tokens * (1 + top)
        if entries > MAX_LOGPROB_ENTRIES:
            raise ApiError(400, f"n ({n}) x max tokens ({max_tokens}) x (1 + {param} {top}) is {entries} "
                                f"log-probabilities; this server returns at most {MAX_LOGPROB_ENTRIES} per request: "
                                f"ask for fewer choices, tokens or alternatives", param=param)

    def sampling(body: _Sampled) -> dict[str, Any]:
        check_unsupported(body)
        out = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "presence_penalty",
                                            "frequency_penalty", "penalty_decay", "seed") if getattr(body, k) is not None}
        if "seed" in out:
            out["seed"] = item_seed(out["seed"], 0)
        if body.logit_bias:
            out["logit_bias"] = {token_id(key, "logit_bias"): bias for key, bias in body.logit_bias.items()}
        return out

    def token_id(text: str | int, param: str) -> int:
        """A token id given by a client (logit_bias keys are text), within the vocabulary."""
        try:
            token = int(text)
        except ValueError:
            raise ApiError(400, f"{param}: {text!r} is not a token id", param=param) from None
        if not 0 <= token < vocab_size:
            raise ApiError(400, f"{param}: token id {token} is outside the vocabulary (0..{vocab_size - 1})", param=param)
        return token

    def check_unsupported(body: _Sampled) -> None:
        """What this server cannot do is refused, not silently left out: a client asking
        for tool calls or JSON output would otherwise get plain text it takes for them."""
        extra = body.model_extra or {}
        for name in ("tools", "functions"):
            if extra.get(name):
                raise ApiError(400, f"{name} are not supported by this server (no tool calls)", param=name)
        if extra.get("tool_choice") not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice: no tools are supported by this server", param="tool_choice")
        form = extra.get("response_format")
        kind = form.get("type") if isinstance(form, dict) else form
        if kind not in (None, "text"):
            raise ApiError(400, f"response_format {kind!r} is not supported (text only)", param="response_format")

    def stops(stop: Stop) -> list[str]:
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else list(stop)

    def submit(prompt: list[int], n: int, **options: Any) -> list[EngineRequest]:
        """The `n` choices' requests (choice i samples with seed + i); all or none: when
        one is refused (a full queue), those already queued are cancelled."""
        requests: list[EngineRequest] = []
        try:
            for i in range(n):
                requests.append(engine.submit(prompt, **dict(options, seed=item_seed(options.get("seed"), i))))
        except BaseException as e:
            for r in requests:
                r.cancel()
            if isinstance(e, TypeError):  # an option of the wrong kind the body's model let through
                raise ApiError(400, str(e)) from None
            raise _from_rwkv(e) if isinstance(e, errors.RwkvError) else e from None
        return requests

    async def encode(texts: list[str], param: str) -> list[list[int]]:
        """Tokenizes off the event loop (the tokenizers release the GIL), so that other
        streams keep flowing while a long prompt is read. Text that is not valid Unicode
        (a lone surrogate, which JSON can carry) is the client's error."""
        try:
            return await asyncio.to_thread(tokenizer.encode_batch, texts)
        except ValueError as e:
            raise ApiError(400, f"{param}: {e}", param=param) from e

    async def started(requests: Sequence[EngineRequest]) -> None:
        """Before a stream's first byte: every request admitted, or the error answered."""
        try:
            for r in requests:
                await r.started()
        except BaseException as e:
            for r in requests:
                r.cancel()
            raise _from_rwkv(e) if isinstance(e, Exception) else e from None

    async def finished(request: EngineRequest) -> None:
        async for _ in engine._watch(request):
            pass
        if request.error is not None:
            raise _from_rwkv(request.error)
        metrics.finished(request)

    def usage(requests: Sequence[EngineRequest]) -> dict[str, Any]:
        prompt = requests[0].prompt_tokens
        completion = sum(len(r.tokens) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": requests[0].cached_tokens}}

    def piece_bytes(token: int) -> list[int]:
        return list(tokenizer.token_bytes(token) or b"")

    def token_text(token: int) -> str:
        return (tokenizer.token_bytes(token) or b"").decode("utf-8", errors="replace")

    def chat_logprobs(infos: Sequence[Any]) -> dict[str, Any]:
        return {"content": [{
            "token": token_text(i.token), "logprob": i.logprob, "bytes": piece_bytes(i.token),
            "top_logprobs": [{"token": token_text(t), "logprob": lp, "bytes": piece_bytes(t)} for t, lp in i.top],
        } for i in infos]}

    def completion_logprobs(infos: Sequence[Any], start: int) -> dict[str, Any]:
        """`start`: where the generated text begins in the choice's text (after an echo)."""
        offsets, at = [], start
        for i in infos:
            offsets.append(at)
            at += len(token_text(i.token))
        return {"tokens": [token_text(i.token) for i in infos], "token_logprobs": [i.logprob for i in infos],
                "top_logprobs": [{token_text(t): lp for t, lp in i.top} for i in infos], "text_offset": offsets}

    async def answer(build: Callable[[], dict[str, Any]]) -> JSONResponse:
        """A non-streamed answer, built and serialized off the event loop: with
        log-probabilities it may hold MAX_LOGPROB_ENTRIES of them, which would stall every
        stream on the loop while it is made."""
        return await asyncio.to_thread(lambda: JSONResponse(build()))

    async def attended(http: Request, work: Awaitable[T]) -> T:
        """`work`, given up (cancelled: its `finally` cancels its engine requests) when the
        client disconnects first, so that a non-streamed answer nobody waits for is not
        generated to the end. (A stream's client leaving ends its body iterator instead.)"""
        async def disconnected() -> None:
            # The body is read: the next message is the disconnect. (Request.is_disconnected
            # never sees it behind a BaseHTTPMiddleware such as `authorize`.)
            while (await http.receive())["type"] != "http.disconnect":
                pass

        task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise ApiError(499, "the client disconnected", code="client_disconnected")  # read by no one
        finally:
            task.cancel()
            gone.cancel()

    async def sse(chunks: AsyncIterator[dict[str, Any] | str]) -> AsyncIterator[str]:
        """Server-sent events of the chunks (dicts, or their JSON made already)."""
        try:
            async for chunk in chunks:
                yield f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"
        except ApiError as e:  # after the first byte only an error event can tell
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': e.param, 'code': e.code}})}\n\n"
        yield "data: [DONE]\n\n"

    async def merged(requests: Sequence[EngineRequest], chat: bool) -> AsyncIterator[tuple[int, str]]:
        """(choice index, piece) from all requests as they come; each request's pieces in
        order. Leaving early cancels them all."""
        queue: asyncio.Queue[tuple[int, str | None, BaseException | None]] = asyncio.Queue()

        async def pump(i: int, request: EngineRequest) -> None:
            try:
                pieces = engine._watch(request)
                async for piece in (_areply(pieces) if chat else pieces):
                    await queue.put((i, piece, None))
                await queue.put((i, None, request.error))
            except BaseException as e:  # noqa: BLE001 (handed to the consumer)
                await queue.put((i, None, e))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
        try:
            left = len(requests)
            while left:
                i, piece, error = await queue.get()
                if piece is None:
                    left -= 1
                    if error is not None:
                        raise _from_rwkv(error)
                    metrics.finished(requests[i])
                    continue
                yield i, piece
        finally:
            for task in tasks:
                task.cancel()
            for request in requests:
                request.cancel()

    # ---- endpoints ----

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "running": engine.stats()["running"],
                "route": None if route is None else route[0]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        body, content_type = metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "rwkv-gpu"}]}

    @app.get("/v1/models/{name:path}")  # names such as org/model hold a slash
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "rwkv-gpu"}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request) -> Any:
        check_model(body.model)
        # The body's model checked the shapes: a text, token ids, or a list of either.
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
            if len(prompt) != 1:
                raise ApiError(400, "give one prompt per request (a list of several is not supported)", param="prompt")
            prompt = prompt[0]
        try:
            ids = (await encode([prompt], "prompt"))[0] if isinstance(prompt, str) else [token_id(t, "prompt") for t in prompt]
        except (TypeError, ValueError) as e:
            raise ApiError(400, f"prompt: {e}", param="prompt") from e
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        check_length(ids, "prompt")
        max_tokens = output_limit(body.max_tokens, 16, "max_tokens")
        check_logprobs(body.n, max_tokens, body.logprobs, "logprobs")
        options = dict(sampling(body), max_tokens=max_tokens, stop=stops(body.stop), top_logprobs=body.logprobs)
        requests = submit(ids, body.n, **options)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = tokenizer.decode(ids) if body.echo else ""

        def choice(i: int, text: str, request: EngineRequest | None) -> dict[str, Any]:
            out: dict[str, Any] = {"index": i, "text": text, "logprobs": None,
                                   "finish_reason": None if request is None else _finish(request)}
            if request is not None and body.logprobs is not None:
                out["logprobs"] = completion_logprobs(request.logprobs, len(echo))
            return out

        if body.stream:
            async def chunks() -> AsyncIterator[dict[str, Any] | str]:
                if echo:
                    for i in range(body.n):
                        yield {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                               "choices": [choice(i, echo, None)]}
                async for i, piece in merged(requests, chat=False):
                    yield {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                           "choices": [choice(i, piece, None)]}
                for i, r in enumerate(requests):
                    def last(i: int = i, r: EngineRequest = r) -> str:
                        return json.dumps({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                                           "choices": [choice(i, "", r)]})
                    # A choice's closing chunk holds its log-probabilities (as chat's does):
                    # one entry per token, so made off the loop.
                    yield await asyncio.to_thread(last) if body.logprobs is not None else last()
                if (body.stream_options or {}).get("include_usage"):
                    yield {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                           "choices": [], "usage": usage(requests)}
            await attended(http, started(requests))  # a client gone while queued frees its place
            return StreamingResponse(sse(chunks()), media_type="text/event-stream")

        async def wait() -> None:
            try:
                for r in requests:
                    await finished(r)
            finally:
                for r in requests:
                    r.cancel()
        await attended(http, wait())
        return await answer(lambda: {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                                     "choices": [choice(i, echo + r.completion().text, r) for i, r in enumerate(requests)],
                                     "usage": usage(requests)})

    async def chat_prompt(messages: Sequence[Message], param: str) -> tuple[list[int], list[int]]:
        """The chat's tokens, each message tokenized alone, and where each message ends."""
        turns = [turn("system" if m.role == "developer" else m.role, _text(m.content)) for m in messages]
        parts = await encode([*turns, REPLY_PROMPT], param)
        ids: list[int] = []
        ends = []
        for part in parts[:-1]:
            ids += part
            ends.append(len(ids))
        return ids + parts[-1], ends

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request) -> Any:
        check_model(body.model)
        ids, ends = await chat_prompt(body.messages, "messages")
        check_length(ids, "messages")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = output_limit(asked, 1024,
                                  "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
        check_logprobs(body.n, max_tokens, top, "top_logprobs")
        options = dict(sampling(body), max_tokens=max_tokens, stop=[REPLY_STOP, *stops(body.stop)],
                       top_logprobs=top, cache_points=ends)
        requests = submit(ids, body.n, **options)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if body.stream:
            async def chunks() -> AsyncIterator[dict[str, Any] | str]:
                head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}
                for i in range(body.n):
                    yield dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}])
                async for i, piece in merged(requests, chat=True):
                    yield dict(head, choices=[{"index": i, "delta": {"content": piece}, "logprobs": None,
                                               "finish_reason": None}])
                for i, r in enumerate(requests):
                    def last(i: int = i, r: EngineRequest = r) -> str:
                        return json.dumps(dict(head, choices=[{
                            "index": i, "delta": {}, "finish_reason": _finish(r),
                            "logprobs": chat_logprobs(r.logprobs) if top is not None else None}]))
                    # With log-probabilities it holds one entry per token: made off the loop.
                    yield await asyncio.to_thread(last) if top is not None else last()
                if (body.stream_options or {}).get("include_usage"):
                    yield dict(head, choices=[], usage=usage(requests))
            await attended(http, started(requests))  # a client gone while queued frees its place
            return StreamingResponse(sse(chunks()), media_type="text/event-stream")

        async def replies() -> list[str]:
            texts = []
            try:
                for r in requests:
                    texts.append("".join([p async for p in _areply(engine._watch(r))]))
                    if r.error is not None:
                        raise _from_rwkv(r.error)
                    metrics.finished(r)
            finally:
                for r in requests:
                    r.cancel()
            return texts
        texts = await attended(http, replies())
        return await answer(lambda: {
            "id": rid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                         "logprobs": chat_logprobs(r.logprobs) if top is not None else None,
                         "finish_reason": _finish(r)} for i, (t, r) in enumerate(zip(texts, requests))],
            "usage": usage(requests)})

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody) -> Any:
        check_model(body.model)
        raw = body.input
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            items: list[Any] = [raw]
        else:
            items = list(raw)  # type: ignore[arg-type]
        if not items or len(items) > 2048:
            raise ApiError(400, f"input must hold 1 to 2048 texts, got {len(items)}", param="input")
        texts = [x for x in items if isinstance(x, str)]
        encoded = iter(await encode(texts, "input") if texts else [])
        batch = [next(encoded) if isinstance(x, str) else [token_id(t, "input") for t in x] for x in items]
        if not all(batch):
            raise ApiError(400, "an input is empty", param="input")
        check_length([t for ids in batch for t in ids], "input")  # the whole call's tokens
        vectors = await asyncio.to_thread(model.embed, batch)
        data = []
        for i, v in enumerate(np.atleast_2d(vectors)):
            vec: Any = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        tokens = sum(len(ids) for ids in batch)
        return {"object": "list", "data": data, "model": model_name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/responses")
    async def create_response(body: ResponseBody, http: Request) -> Any:
        check_model(body.model)
        if body.stream:
            raise ApiError(400, "streamed responses are not supported yet: use /v1/chat/completions to stream",
                           param="stream")
        state = None
        if body.previous_response_id is not None:
            stored = responses.get(body.previous_response_id)
            if stored is None:
                raise ApiError(404, f"response {body.previous_response_id!r} is not stored here (unknown or evicted)",
                               param="previous_response_id", code="response_not_found")
            state = stored.clone()
        messages = [Message(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input)
        if not messages:
            raise ApiError(400, "input is empty: give a text or at least one message", param="input")
        # New instructions apply to this response: a system turn before its input (a
        # continued response's state already holds the earlier ones; it cannot unlearn them).
        if body.instructions:
            messages.insert(0, Message(role="system", content=body.instructions))
        ids, ends = await chat_prompt(messages, "input")
        check_length(ids, "input")
        options = dict(sampling(body), max_tokens=output_limit(body.max_output_tokens, 1024, "max_output_tokens"), stop=[REPLY_STOP],
                       cache_points=ends, state=state, return_state=state is None and body.store)
        (request,) = submit(ids, 1, **options)

        async def reply() -> str:
            try:
                return "".join([p async for p in _areply(engine._watch(request))])
            finally:
                request.cancel()
        text = await attended(http, reply())
        if request.error is not None:
            raise _from_rwkv(request.error)
        metrics.finished(request)
        rid = response_id(route)
        if body.store and request.state is not None:
            responses.put(rid, request.state)
        reason = _finish(request)
        return {
            "id": rid, "object": "response", "created_at": int(time.time()), "model": model_name,
            "status": "completed" if reason == "stop" else "incomplete",
            "incomplete_details": None if reason == "stop" else {"reason": "max_output_tokens"},
            "previous_response_id": body.previous_response_id, "instructions": body.instructions,
            "output": [{"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": request.prompt_tokens, "output_tokens": len(request.tokens),
                      "total_tokens": request.prompt_tokens + len(request.tokens),
                      "input_tokens_details": {"cached_tokens": request.cached_tokens},
                      "output_tokens_details": {"reasoning_tokens": 0}},
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "store": body.store,
            "temperature": body.temperature, "top_p": body.top_p,
        }

    metrics.paths = frozenset(path for route in app.routes if "{" not in (path := getattr(route, "path", "{")))
    app.state.engine = engine
    app.state.responses = responses
    return app


def _finish(request: EngineRequest) -> str:
    return "stop" if request.finish_reason == "stop" else "length"


async def _areply(pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    """`conversation.reply_text` for an async stream."""
    start = ReplyStart()
    async for piece in pieces:
        piece = start.push(piece)
        if piece:
            yield piece
