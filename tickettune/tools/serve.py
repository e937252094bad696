"""`tickettune serve`: a saved model behind an HTTP API (its own and OpenAI's shape) and a triage page.

    tickettune serve --weights runs/weights [--host 127.0.0.1] [--port 8000] [--max-batch 16]

Owns the HTTP side of prediction: the routes, request validation (400 naming the field), the API key,
the body limit, micro-batching of concurrent requests onto one model worker, back-pressure (503 with
Retry-After), per-request failure isolation, graceful shutdown and the page at `/`. It does not own
the model: `TicketModel` (tickettune.pipeline) classifies and answers; this module only feeds it
batches of `Ticket`s, one call at a time, from a single worker thread (`predict` is not thread-safe).

Routes (every one but `/healthz` needs `Authorization: Bearer $TICKETTUNE_API_KEY` when that is set):

    POST /v1/tickets           {"tickets": [{"id", "ticket"}]} -> {"predictions": [{"id", "predicted_intent",
                               "prediction", "intent_scores", "reply_source", "latency_ms"}]}
    POST /v1/chat/completions  OpenAI's request and response; the last user message is the ticket, the
                               reply is the message content; `intent`, `intent_scores`, `reply_source` ride
                               along at the top level of the response
    GET  /v1/models            OpenAI's model list (one model)
    GET  /healthz              200 once the model is loaded (503 while it loads)
    GET  /                     the triage page (no external resources)

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the `openai` SDK raises
its own exception classes. Test hook: `TICKETTUNE_SERVE_PREDICTOR=module:factory` makes the server call
`factory()` for its predictor instead of loading `--weights` (for tests of the process: SIGTERM, logs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import importlib
import json
import logging
import math
import os
import signal
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tickettune.pipeline.data import Ticket
from tickettune.pipeline.results import Prediction

log = logging.getLogger("tickettune.serve")
EXIT_BAD_INPUT = 2
API_KEY_ENV = "TICKETTUNE_API_KEY"
PREDICTOR_HOOK_ENV = "TICKETTUNE_SERVE_PREDICTOR"
MAX_TICKET_CHARS = 100_000      # run.py's hostile-input size: longer tickets are cut, with a warning
MAX_ID_CHARS = 256              # ids are echoed and logged; a longer one is refused
DEFAULT_MAX_BODY = 1_000_000    # bytes (1 MB)
DRAIN_FACTOR = 16               # an over-limit body is read and dropped up to 16x the limit, so that the
                                # client, still sending, can read the 413 (closing on unread data resets it)
OPEN_PATHS = frozenset({"/healthz"})
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "overloaded_error"}


class Predictor(Protocol):
    """What the server needs of a model: `TicketModel` is one; tests pass fakes."""

    @property
    def labels(self) -> list[str]: ...

    def predict(self, tickets: list[Ticket]) -> tuple[list[Prediction], list[dict]]: ...


@dataclass(frozen=True)
class Settings:
    max_batch: int = 16             # tickets per model call (the CPU plan's generation batch)
    max_wait_s: float = 0.05        # how long the first ticket of a batch waits for company: a batch takes
                                    # seconds, and clients answered together come back spread over tens of ms
    max_queue: int = 64             # tickets waiting for the model (beyond the batch being predicted)
    max_body: int = DEFAULT_MAX_BODY
    model_name: str = "tickettune"

    def __post_init__(self) -> None:
        for name, value, low in (("max_batch", self.max_batch, 1), ("max_queue", self.max_queue, 1),
                                 ("max_body", self.max_body, 1), ("max_wait_s", self.max_wait_s, 0)):
            if not value >= low:
                raise ValueError(f"{name} must be >= {low}, got {value}")


# --- errors and request validation ---------------------------------------------------------------

class ApiError(Exception):
    """An error answer: status, a message that names the field, OpenAI's `param`, extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": None}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param), exc.status, headers=exc.headers)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", list: "array", dict: "object"}.get(type(value), "value")


def _bad(where: str, problem: str) -> ApiError:
    return ApiError(400, f"{where}: {problem}", where)


def _field(obj: dict, name: str, where: str, kind: type, kind_name: str, required: bool = True) -> Any:
    path = f"{where}.{name}" if where else name
    if name not in obj:
        if required:
            raise _bad(path, "missing field")
        return None
    value = obj[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise _bad(path, f"must be {kind_name}, got {_json_type(value)}")
    return value


def parse_json(body: bytes) -> dict:
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _bad("body", f"not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise _bad("body", f"malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise _bad("body", f"expected a JSON object, got {_json_type(obj)}")
    return obj


def cut_ticket(ticket_id: Any, text: str) -> str:
    if len(text) > MAX_TICKET_CHARS:
        log.warning("ticket %r has %d characters: truncated to %d", ticket_id, len(text), MAX_TICKET_CHARS)
        return text[:MAX_TICKET_CHARS]
    return text


def parse_tickets(obj: dict) -> list[Ticket]:
    """`{"tickets": [{"id": str|int, "ticket": str}]}`, every id distinct."""
    rows = _field(obj, "tickets", "", list, "an array of {\"id\", \"ticket\"} objects")
    tickets, first_at = [], {}
    for n, row in enumerate(rows):
        where = f"tickets[{n}]"
        if not isinstance(row, dict):
            raise _bad(where, f"must be an object with \"id\" and \"ticket\", got {_json_type(row)}")
        tid = _field(row, "id", where, (str, int), "a string or an integer")
        text = _field(row, "ticket", where, str, "a string")
        if tid == "":
            raise _bad(f"{where}.id", "is empty")
        if isinstance(tid, str) and len(tid) > MAX_ID_CHARS:
            raise _bad(f"{where}.id", f"longer than {MAX_ID_CHARS} characters")
        if tid in first_at:
            raise _bad(f"{where}.id", f"duplicated id {tid!r} (first at tickets[{first_at[tid]}])")
        first_at[tid] = n
        tickets.append(Ticket(tid, cut_ticket(tid, text)))
    return tickets


def parse_chat(obj: dict) -> str:
    """The ticket of an OpenAI chat request: the text of its last user message."""
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"must be a string, got {_json_type(model)}")
    if obj.get("stream") not in (None, False):
        raise _bad("stream", "streaming responses are not supported: leave it out or false")
    if obj.get("n") not in (None, 1):
        raise _bad("n", "only one choice is supported")
    messages = _field(obj, "messages", "", list, "an array of {\"role\", \"content\"} objects")
    last_user = None
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{n}]", f"must be an object with \"role\" and \"content\", got {_json_type(message)}")
        if _field(message, "role", f"messages[{n}]", str, "a string") == "user":
            last_user = n
    if last_user is None:
        raise _bad("messages", "no message with role \"user\" (the last one is the ticket)")
    where = f"messages[{last_user}]"
    content = _field(messages[last_user], "content", where, (str, list), "a string or an array of text parts")
    if isinstance(content, str):
        return content
    texts = []
    for n, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _bad(f"{where}.content[{n}]", "only {\"type\": \"text\", \"text\": string} parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)


# --- the model worker ------------------------------------------------------------------------------

class ModelFailure(RuntimeError):
    """The model raised while predicting this request's tickets (logged with its traceback)."""


@dataclass(frozen=True)
class Result:
    prediction: Prediction
    diagnostics: dict
    latency_ms: int             # from the request's arrival to its batch's end (queueing included)
    completion_tokens: int      # tokens of the reply, where the predictor has a tokenizer, else 0


@dataclass
class _Item:
    ticket: Ticket
    request: int                # which request it came from: a failing batch is retried per request
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Gathers the tickets of concurrent requests into micro-batches for one model worker thread.

    The first ticket waiting opens a batch; the batch is sent to the model once it holds `max_batch`
    tickets or the first has waited `max_wait_s`. At most `max_queue` tickets wait (a request that does
    not fit is refused whole: 503 with Retry-After). When a batch mixing several requests fails, each request is
    predicted again on its own, so that only the one that fails gets the error."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.predictor: Predictor | None = None
        self.load_error: str | None = None
        self.stats = {"batches": 0, "tickets": 0, "failed_requests": 0}
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tickettune-model")
        self._task: asyncio.Task | None = None
        self._requests = 0
        self._batch_s = 1.0      # running mean of a batch's seconds, for Retry-After

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def start(self, predictor: Predictor | None = None,
                    loader: Callable[[], Predictor] | None = None) -> asyncio.Task | None:
        """Start the worker; with `loader`, load the predictor on the model thread (returns that task)."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="tickettune-batcher")
        self.predictor = predictor
        if loader is None:
            return None
        return asyncio.create_task(self._load(loader), name="tickettune-load")

    async def _load(self, loader: Callable[[], Predictor]) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.predictor = await loop.run_in_executor(self._executor, loader)
        except Exception as exc:  # noqa: BLE001 - reported, and the server stops
            log.exception("cannot load the model")
            self.load_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            raise

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(ApiError(503, "the server is shutting down", headers={"Retry-After": "5"}))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: the batches ahead of a new ticket, timed."""
        batches_ahead = math.ceil(len(self._pending) / self.settings.max_batch) + 1
        return max(1, math.ceil(batches_ahead * self._batch_s))

    async def submit(self, tickets: list[Ticket]) -> list[Result]:
        """The results of `tickets`, in order. Raises `ApiError` 503 when they do not fit in the queue
        or no model is loaded, `ModelFailure` when the model fails on them."""
        if self.predictor is None:
            why = "the model failed to load" if self.load_error else "the model is still loading"
            raise ApiError(503, why, headers={"Retry-After": "5"})
        if len(tickets) > self.settings.max_queue:
            raise ApiError(413, f"tickets: {len(tickets)} tickets in one request, at most {self.settings.max_queue} "
                                "(the server's --max-queue)", "tickets")
        if len(self._pending) + len(tickets) > self.settings.max_queue:
            raise ApiError(503, f"the queue is full ({len(self._pending)} of {self.settings.max_queue} tickets "
                                "waiting): retry later", headers={"Retry-After": str(self.retry_after())})
        if not tickets:
            return []
        self._requests += 1
        loop = asyncio.get_running_loop()
        items = [_Item(t, self._requests, loop.create_future()) for t in tickets]
        self._pending.extend(items)
        self._wakeup.set()
        outcomes = await asyncio.gather(*(i.future for i in items), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].arrived + self.settings.max_wait_s
            while len(self._pending) < self.settings.max_batch and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), left)
            batch = []
            while self._pending and len(batch) < self.settings.max_batch:
                item = self._pending.popleft()
                if not item.future.done():  # a request cancelled while waiting is not predicted
                    batch.append(item)
            if batch:
                try:
                    await self._predict_batch(loop, batch)
                except Exception as exc:  # noqa: BLE001 - the worker must outlive any one batch
                    log.exception("batch failed outside the model")
                    self._fail(batch, exc)

    async def _predict_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        t0 = time.monotonic()
        waited_ms = (t0 - batch[0].arrived) * 1000
        requests = sorted({i.request for i in batch})
        failure = await self._attempt(loop, batch)
        if failure is not None and len(requests) == 1:
            self._fail(batch, failure)
        elif failure is not None:  # isolate: each request again on its own, so only the failing one fails
            log.warning("batch of %d tickets from %d requests failed (%s): predicting each request alone",
                        len(batch), len(requests), type(failure).__name__)
            for request in requests:
                part = [i for i in batch if i.request == request]
                if (failure := await self._attempt(loop, part)) is not None:
                    self._fail(part, failure)
        seconds = time.monotonic() - t0
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        self.stats["batches"] += 1
        self.stats["tickets"] += len(batch)
        log.info("batch %d: %d tickets from %d requests in %.0f ms (first waited %.0f ms), %d queued",
                 self.stats["batches"], len(batch), len(requests), seconds * 1000, waited_ms, len(self._pending))

    async def _attempt(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> Exception | None:
        """Predict `items` on the model thread and deliver the results; the exception, if it fails."""
        try:
            results = await loop.run_in_executor(self._executor, self._predict, [i.ticket for i in items])
        except Exception as exc:  # noqa: BLE001 - any failure of the model is this request's, not the server's
            return exc
        self._deliver(items, results)
        return None

    def _predict(self, tickets: list[Ticket]) -> list[tuple[Prediction, dict, int]]:
        """On the model thread: the predictor's answer for `tickets`, checked, with reply token counts."""
        predictions, diagnostics = self.predictor.predict(tickets)
        if len(predictions) != len(tickets) or len(diagnostics) != len(tickets):
            raise RuntimeError(f"the predictor answered {len(predictions)} predictions and {len(diagnostics)} "
                               f"diagnostics for {len(tickets)} tickets")
        tokenizer = getattr(self.predictor, "tokenizer", None)
        counts = [len(tokenizer(p.prediction, add_special_tokens=False)["input_ids"]) if tokenizer else 0
                  for p in predictions]
        return list(zip(predictions, diagnostics, counts))

    def _deliver(self, items: list[_Item], results: list[tuple[Prediction, dict, int]]) -> None:
        now = time.monotonic()
        for item, (prediction, diagnostics, n_tokens) in zip(items, results):
            if not item.future.done():
                item.future.set_result(Result(prediction, diagnostics, int(round((now - item.arrived) * 1000)),
                                              n_tokens))

    def _fail(self, items: list[_Item], exc: Exception) -> None:
        log.error("request failed in the model (%d tickets: %s)", len(items),
                  ", ".join(repr(i.ticket.id) for i in items[:5]) + (" ..." if len(items) > 5 else ""),
                  exc_info=(type(exc), exc, exc.__traceback__))
        self.stats["failed_requests"] += len({i.request for i in items})
        failure = ModelFailure(f"the model failed on this request ({type(exc).__name__}); the server goes on")
        for item in items:
            if not item.future.done():
                item.future.set_exception(failure)


# --- the HTTP guard: API key and body limit --------------------------------------------------------

class Guard:
    """ASGI middleware in front of every route: the API key (constant-time comparison; never logged)
    and the body limit (413; a longer body is read and dropped up to DRAIN_FACTOR x the limit, so that
    the client can read the answer). The app behind it gets the body already read."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # names are lower-case bytes
        refusal = None
        if self._key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            refusal = ApiError(401, f"missing or wrong API key: send \"Authorization: Bearer <{API_KEY_ENV}>\"",
                               headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length", b"0")
        if refusal is None and (not declared.isdigit() or int(declared) > self.max_body):
            refusal = ApiError(413, f"body larger than {self.max_body} bytes") if declared.isdigit() \
                else _bad("content-length", "not a number")
        if refusal is not None and declared.isdigit() and int(declared) > self.max_body * DRAIN_FACTOR:
            return await self._answer(send, refusal)  # too big even to drain: answer and let it close
        body, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if refusal is None and size > self.max_body:
                refusal = ApiError(413, f"body larger than {self.max_body} bytes")
            if refusal is None:
                body.append(chunk)
            if not message.get("more_body", False) or size > self.max_body * DRAIN_FACTOR:
                break
        if refusal is not None:
            return await self._answer(send, refusal)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # http.disconnect, when the client goes

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    @staticmethod
    async def _answer(send: Callable, exc: ApiError) -> None:
        payload = json.dumps(error_body(exc.status, exc.message, exc.param)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


# --- the app ---------------------------------------------------------------------------------------

def create_app(predictor: Predictor | None = None, loader: Callable[[], Predictor] | None = None,
               settings: Settings | None = None, api_key: str | None = None,
               on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI app. Give `predictor` (ready now) or `loader` (called on the model thread after start;
    `/healthz` is 503 until it returns; if it raises, `on_load_failure` is called to stop the server)."""
    if (predictor is None) == (loader is None):
        raise ValueError("give exactly one of predictor and loader")
    settings = settings or Settings()
    batcher = Batcher(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = await batcher.start(predictor, loader)
        if loading is not None and on_load_failure is not None:
            loading.add_done_callback(lambda task: task.cancelled() or task.exception() is None or on_load_failure())
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            await batcher.stop()

    app = FastAPI(title="tickettune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.settings = settings
    app.add_middleware(Guard, api_key=api_key, max_body=settings.max_body)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error ({type(exc).__name__})"))

    async def predict(tickets: list[Ticket]) -> list[Result]:
        try:
            return await batcher.submit(tickets)
        except ModelFailure as exc:
            raise ApiError(500, str(exc)) from None

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if batcher.predictor is None:
            status = "failed" if batcher.load_error else "loading"
            return JSONResponse({"status": status}, 503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", "model": settings.model_name, "queued": batcher.queued,
                             **batcher.stats})

    @app.post("/v1/tickets")
    async def tickets(request: Request) -> JSONResponse:
        results = await predict(parse_tickets(parse_json(await request.body())))
        return JSONResponse({"predictions": [ticket_answer(r) for r in results]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        text = parse_chat(parse_json(await request.body()))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        [result] = await predict([Ticket(completion_id, cut_ticket(completion_id, text))])
        return JSONResponse(chat_answer(completion_id, settings.model_name, result))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        labels = list(batcher.predictor.labels) if batcher.predictor is not None else []
        return JSONResponse({"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                                         "created": STARTED, "owned_by": "tickettune",
                                                         "intents": labels}]})

    @app.get("/")
    async def page() -> Response:
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    return app


STARTED = int(time.time())


def intent_scores(diagnostics: dict) -> dict[str, float]:
    """The ensemble's probability of each intent, most likely first."""
    probs = diagnostics.get("intent_probs") or {}
    return dict(sorted(probs.items(), key=lambda kv: (-kv[1], kv[0])))


def ticket_answer(result: Result) -> dict:
    p = result.prediction
    return {"id": p.id, "predicted_intent": p.predicted_intent, "prediction": p.prediction,
            "intent_scores": intent_scores(result.diagnostics),
            "reply_source": result.diagnostics.get("reply_action", "generated"), "latency_ms": result.latency_ms}


def chat_answer(completion_id: str, model_name: str, result: Result) -> dict:
    p = result.prediction
    completion = result.completion_tokens
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": p.prediction, "refusal": None},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": max(p.tokens_used - completion, 0), "completion_tokens": completion,
                  "total_tokens": max(p.tokens_used, completion)},
        "system_fingerprint": None,
        "intent": p.predicted_intent, "intent_scores": intent_scores(result.diagnostics),
        "reply_source": result.diagnostics.get("reply_action", "generated"), "latency_ms": result.latency_ms,
    }


# --- the command -----------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="weights folder written by run.py")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: a GPU when there is one")
    parser.add_argument("--max-batch", type=int, default=Settings.max_batch,
                        help=f"most tickets per model call (default {Settings.max_batch}; 1 = no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=Settings.max_wait_s * 1000,
                        help=f"how long a ticket waits for others to share its batch (default {Settings.max_wait_s * 1000:g})")
    parser.add_argument("--max-queue", type=int, default=Settings.max_queue,
                        help=f"most tickets waiting for the model; beyond, 503 + Retry-After (default {Settings.max_queue})")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                        help=f"largest request body; beyond, 413 (default {DEFAULT_MAX_BODY})")
    parser.add_argument("--model-name", default=Settings.model_name, help="the model id /v1/models reports")
    parser.add_argument("--graceful-timeout", type=float, default=60.0,
                        help="on SIGTERM, seconds in-flight requests get to finish (default 60)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also the model's own log lines per batch")


def main(args: argparse.Namespace) -> int:
    from tickettune.pipeline import runlog

    runlog.setup(args.verbose)
    problems, api_key = [], os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        problems.append(f"{API_KEY_ENV} is set but empty: set a key, or unset it to serve without one")
    problems += [f"{flag} {value}: must be >= {low}" for flag, value, low in (
        ("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
        ("--max-body-bytes", args.max_body_bytes, 1), ("--max-wait-ms", args.max_wait_ms, 0),
        ("--graceful-timeout", args.graceful_timeout, 0)) if not value >= low]
    if not 0 <= args.port <= 65535:
        problems.append(f"--port {args.port}: not a port number")
    hook = os.environ.get(PREDICTOR_HOOK_ENV)
    if hook:
        loader = _hooked_loader(hook, problems)
    else:
        loader = _model_loader(args, problems)
    if problems:
        log.error("cannot start:\n%s", "\n".join(problems))
        return EXIT_BAD_INPUT

    import uvicorn

    settings = Settings(args.max_batch, args.max_wait_ms / 1000, args.max_queue, args.max_body_bytes, args.model_name)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without %s: anyone who can reach this port can use the model",
                    args.host, API_KEY_ENV)
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(loader=loader, settings=settings, api_key=api_key, on_load_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                                           server_header=False, timeout_graceful_shutdown=args.graceful_timeout))
    log.info("serving %s on http://%s:%d (max batch %d, max wait %g ms, max queue %d, API key %s)",
             settings.model_name, args.host, args.port, settings.max_batch, settings.max_wait_s * 1000,
             settings.max_queue, "required" if api_key else "not required")
    # uvicorn finishes the in-flight requests on SIGTERM/SIGINT, then re-raises the signal to the handler
    # it found: these make that a normal exit (0) instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("stopped by signal %d", signum))
    server.run()
    if app.state.batcher.load_error:
        return 1
    return 0 if server.started else 1


def _model_loader(args: argparse.Namespace, problems: list[str]) -> Callable[[], Predictor]:
    """Check the weights folder now (exit 2 before binding); the loader loads it on the model thread."""
    from tickettune.pipeline.weights_folder import WeightsError, read_metadata

    try:
        meta = read_metadata(Path(args.weights))
    except WeightsError as exc:
        problems.append(str(exc))
        meta = {}
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("--device cuda: no GPU here")
    if meta.get("plan", {}).get("model", "").startswith("bundled:"):
        os.environ["HF_HUB_OFFLINE"] = "1"  # the bundled model never touches a hub (as run.py)

    def load() -> Predictor:
        from tickettune.pipeline.ticket_model import TicketModel

        t0 = time.monotonic()
        model = TicketModel.load(args.weights, device=args.device)
        log.info("model loaded in %.1f s: %s, %d intents", time.monotonic() - t0, model.plan.describe(),
                 len(model.labels))
        if not args.verbose:  # one line per batch: the model's own per-call lines only with -v
            logging.getLogger("tickettune.pipeline").setLevel(logging.WARNING)
        return model

    return load


def _hooked_loader(hook: str, problems: list[str]) -> Callable[[], Predictor]:
    module_name, _, attr = hook.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        problems.append(f"{PREDICTOR_HOOK_ENV}={hook}: {exc}")
        return lambda: None
    log.warning("%s=%s: serving that predictor, not --weights", PREDICTOR_HOOK_ENV, hook)
    return factory


# --- the page --------------------------------------------------------------------------------------

_SCRIPT = r"""
const $ = (id) => document.getElementById(id);
const pct = (p) => (100 * p).toFixed(p >= 0.995 || p < 0.005 ? 0 : 1) + "%";

function bar(label, p, main) {
  const row = document.createElement("div");
  row.className = main ? "bar main" : "bar";
  const name = document.createElement("span");
  name.className = "label";
  name.textContent = label;
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = (100 * p).toFixed(1) + "%";
  track.appendChild(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = pct(p);
  row.append(name, track, value);
  return row;
}

async function triage() {
  const text = $("ticket").value;
  if (!text.trim()) { $("ticket").focus(); return; }
  $("go").disabled = true;
  $("status").textContent = "Reading the ticket\u2026";
  $("error").hidden = true;
  try {
    const response = await fetch("v1/tickets", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({tickets: [{id: "page", ticket: text}]}),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error((data.error && data.error.message) || ("HTTP " + response.status));
    show(data.predictions[0]);
    $("status").textContent = "";
  } catch (err) {
    $("error").textContent = "Could not triage this ticket: " + err.message;
    $("error").hidden = false;
    $("status").textContent = "";
  } finally {
    $("go").disabled = false;
  }
}

function show(p) {
  const scores = Object.entries(p.intent_scores).sort((a, b) => b[1] - a[1]);
  const confidence = p.intent_scores[p.predicted_intent] ?? (scores.length ? scores[0][1] : 0);
  $("intent").textContent = p.predicted_intent;
  $("confidence").replaceChildren(bar("confidence", confidence, true));
  const others = scores.filter(([label]) => label !== p.predicted_intent).slice(0, 3);
  $("alternatives").replaceChildren(...others.map(([label, q]) => bar(label, q, false)));
  $("alt-heading").hidden = others.length === 0;
  $("reply").textContent = p.prediction;
  $("source").textContent = {generated: "generated", repaired: "generated, facts restored",
                             retrieved: "composed from the desk's replies",
                             fallback: "composed from the desk's replies (generation failed)"}[p.reply_source]
                            || p.reply_source;
  $("latency").textContent = p.latency_ms + " ms";
  $("result").hidden = false;
}

$("go").addEventListener("click", triage);
$("ticket").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) triage(); });
$("copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("reply").textContent));
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tickettune · triage</title>
<link rel="icon" href="data:,">
<style>
  :root { --ink: #1d2433; --muted: #5b6577; --line: #dde2ea; --accent: #2f6fdf; --bg: #f6f7fb; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
         background: var(--bg); }
  main { max-width: 760px; margin: 32px auto; padding: 0 16px; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  p.lead { margin: 0 0 16px; color: var(--muted); }
  textarea { width: 100%; min-height: 140px; padding: 12px; font: inherit; border: 1px solid var(--line);
             border-radius: 8px; resize: vertical; background: #fff; }
  .actions { display: flex; align-items: center; gap: 12px; margin: 10px 0 20px; }
  button { font: inherit; padding: 8px 18px; border: 0; border-radius: 6px; background: var(--accent); color: #fff;
           cursor: pointer; }
  button:disabled { opacity: .6; cursor: progress; }
  button.secondary { background: #e8ecf4; color: var(--ink); padding: 4px 12px; font-size: 13px; }
  .hint, #status { color: var(--muted); font-size: 13px; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px; }
  .kicker { text-transform: uppercase; letter-spacing: .06em; font-size: 11px; color: var(--muted); margin: 0; }
  #intent { font-size: 22px; font-weight: 600; margin: 2px 0 8px; word-break: break-word; }
  .bar { display: grid; grid-template-columns: 190px 1fr 56px; align-items: center; gap: 10px; margin: 4px 0; }
  .bar .label { font-size: 13px; color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .bar .track { height: 8px; background: #edf0f5; border-radius: 4px; overflow: hidden; }
  .bar .fill { display: block; height: 100%; background: #9aa8c2; border-radius: 4px; }
  .bar.main .track { height: 12px; border-radius: 6px; }
  .bar.main .fill { background: var(--accent); }
  .bar .value { font-variant-numeric: tabular-nums; font-size: 13px; text-align: right; }
  h2 { font-size: 14px; margin: 18px 0 6px; }
  #reply { white-space: pre-wrap; background: var(--bg); border-radius: 8px; padding: 12px 14px; margin: 0; }
  .meta { display: flex; gap: 12px; align-items: center; margin-top: 8px; color: var(--muted); font-size: 13px; }
  #error { color: #a3261b; background: #fdecea; border-radius: 8px; padding: 10px 14px; }
</style>
</head>
<body>
<main>
  <h1>Ticket triage</h1>
  <p class="lead">Paste a customer's ticket: the model names its intent and drafts a reply.</p>
  <textarea id="ticket" placeholder="e.g. I was charged twice for my subscription this month." autofocus></textarea>
  <div class="actions">
    <button id="go" type="button">Triage</button>
    <span class="hint">Ctrl+Enter</span>
    <span id="status" role="status"></span>
  </div>
  <div id="error" role="alert" hidden></div>
  <section id="result" class="card" hidden>
    <p class="kicker">Intent</p>
    <div id="intent"></div>
    <div id="confidence"></div>
    <h2 id="alt-heading">Alternatives</h2>
    <div id="alternatives"></div>
    <h2>Draft reply</h2>
    <p id="reply"></p>
    <div class="meta"><span>Source: <span id="source"></span></span><span id="latency"></span>
      <button id="copy" class="secondary" type="button">Copy reply</button></div>
  </section>
</main>
<script>""" + _SCRIPT + """</script>
</body>
</html>
"""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
PAGE_HEADERS = {  # only this page's own script runs; it may talk to this server only
    "Content-Security-Policy": f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
