"""The ASGI app: routes over a backend that predicts (in this process, or on Ray Serve: `ray_app`).

Routes (every one but `/healthz` and the page needs `Authorization: Bearer $TICKETTUNE_API_KEY` when that is
set; `/v1/admin/` needs `$TICKETTUNE_ADMIN_KEY` and is off without it):

    POST /v1/tickets           {"desk"?, "tickets": [{"id", "ticket"}]} -> {"desk", "predictions": [{"id",
                               "predicted_intent", "prediction", "intent_scores", "reply_source", "latency_ms"}]}
    POST /v1/chat/completions  OpenAI's request and response (`stream: true`: server-sent events); `model`
                               names the desk; the last user message is the ticket; `intent`,
                               `intent_scores`, `reply_source` ride along at the top level
    GET  /v1/models            OpenAI's model list: one model per desk, with its intents
    POST /v1/admin/desks       {"name", "weights"}: serve another desk from now on (no restart)
    GET  /healthz              200 once the desks loaded at start are loaded (503 while they load)
    GET  /                     the triage page (page.html + page.js; no external resources)

`desk` may be left out (and `model` may be anything) when the server has one desk. Errors use OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, so the `openai` SDK raises its own exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from importlib import resources
from typing import Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tickettune.pipeline.data import Ticket
from tickettune.tools.serve.batching import Batcher, ModelFailure, Predictor, Settings
from tickettune.tools.serve.desks import Desk, DeskError, Desks
from tickettune.tools.serve.guard import Guard
from tickettune.tools.serve.schemas import (ApiError, Result, chat_answer, chat_stream, cut_ticket, error_body,
                                            parse_chat, parse_json, parse_new_desk, parse_tickets, ticket_answer)

log = logging.getLogger("tickettune.serve")
STARTED = int(time.time())
PAGE = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
PAGE_SCRIPT = resources.files(__package__).joinpath("page.js").read_text(encoding="utf-8")
PAGE_HEADERS = {  # only this page's own script runs; it may talk to this server only
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Backend(Protocol):
    """Where predictions are made: `LocalBackend` (a model thread here) or `ray_app.RayBackend`."""

    desks: Desks

    async def start(self) -> asyncio.Task | None: ...
    async def stop(self) -> None: ...
    async def submit(self, desk: str, tickets: list[Ticket]) -> list[Result]: ...
    def health(self) -> tuple[int, dict]: ...


class LocalBackend:
    """The desks' models on one model thread of this process, fed by the `Batcher`. At start, the first
    `max_loaded` desks load (healthz is 503 until they have); the others load on first use."""

    def __init__(self, desks: Desks, settings: Settings) -> None:
        self.desks, self.settings = desks, settings
        self.batcher = Batcher(settings, desks.get)
        self.ready, self.load_error = False, None

    async def start(self) -> asyncio.Task | None:
        self.batcher.start()
        loaded = set(self.desks.loaded())
        first = [name for name in self.desks.names()[:self.desks.max_loaded] if name not in loaded]
        if not first:
            self.ready = True
            return None
        return asyncio.create_task(self._preload(first), name="tickettune-load")

    async def _preload(self, names: list[str]) -> None:
        try:
            for name in names:
                await self.batcher.on_model_thread(self.desks.get, name)
        except Exception as exc:  # noqa: BLE001 - reported, and the server stops
            log.exception("cannot load the model")
            self.load_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            raise
        self.ready = True

    async def stop(self) -> None:
        await self.batcher.stop()

    async def submit(self, desk: str, tickets: list[Ticket]) -> list[Result]:
        if not self.ready:
            why = "the model failed to load" if self.load_error else "the model is still loading"
            raise ApiError(503, why, headers={"Retry-After": "5"})
        return await self.batcher.submit(desk, tickets)

    def health(self) -> tuple[int, dict]:
        if not self.ready:
            return 503, {"status": "failed" if self.load_error else "loading"}
        names = self.desks.names()
        return 200, {"status": "ok", "model": names[0] if len(names) == 1 else None, "desks": names,
                     "loaded": self.desks.loaded(), "queued": self.batcher.queued, **self.batcher.stats}


def single_desk(settings: Settings, predictor: Predictor | None, loader: Callable[[], Predictor] | None) -> Desks:
    """One desk named `settings.model_name`: a predictor ready now, or one `loader` makes on the model thread."""
    if (predictor is None) == (loader is None):
        raise ValueError("give exactly one of predictor and loader")
    desks = Desks(settings.max_loaded_desks)
    if predictor is not None:
        desks.add(Desk(settings.model_name, lambda key: predictor, labels=list(predictor.labels)), ready=predictor)
    else:
        desks.add(Desk(settings.model_name, lambda key: loader()))
    return desks


def create_app(predictor: Predictor | None = None, loader: Callable[[], Predictor] | None = None,
               settings: Settings | None = None, api_key: str | None = None,
               on_load_failure: Callable[[], None] | None = None, *, desks: Desks | None = None,
               backend: Backend | None = None, admin_key: str | None = None) -> FastAPI:
    """The ASGI app. Give the desks one of three ways: `predictor` (one desk, ready now), `loader` (one
    desk, loaded on the model thread after start), `desks` (a table of many); or a whole `backend`.
    `/healthz` is 503 until the start's loads are done; if they fail, `on_load_failure` stops the server."""
    settings = settings or Settings()
    if backend is None:
        backend = LocalBackend(desks if desks is not None else single_desk(settings, predictor, loader), settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = await backend.start()
        if loading is not None and on_load_failure is not None:
            loading.add_done_callback(lambda task: task.cancelled() or task.exception() is None or on_load_failure())
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            await backend.stop()

    app = FastAPI(title="tickettune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend, app.state.settings = backend, settings
    app.state.batcher = getattr(backend, "batcher", None)  # the local backend's (for tests and benches)
    app.add_middleware(Guard, api_key=api_key, max_body=settings.max_body, admin_key=admin_key)
    _errors(app)
    _routes(app, backend)
    return app


def _errors(app: FastAPI) -> None:
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


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param), exc.status, headers=exc.headers)


def _routes(app: FastAPI, backend: Backend) -> None:
    desks = backend.desks

    async def predict(desk: str, tickets: list[Ticket]) -> list[Result]:
        try:
            return await backend.submit(desk, tickets)
        except ModelFailure as exc:
            raise ApiError(500, str(exc)) from None

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        status, body = backend.health()
        return JSONResponse(body, status, headers={"Retry-After": "5"} if status == 503 else None)

    @app.post("/v1/tickets")
    async def tickets(request: Request) -> JSONResponse:
        named, rows = parse_tickets(parse_json(await request.body()))
        desk = desks.resolve(named, "desk")
        results = await predict(desk, rows)
        return JSONResponse({"desk": desk, "predictions": [ticket_answer(r) for r in results]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat = parse_chat(parse_json(await request.body()))
        desk = desks.resolve(chat.model, "model")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        [result] = await predict(desk, [Ticket(completion_id, cut_ticket(completion_id, chat.ticket))])
        if chat.stream:
            return StreamingResponse(iter(chat_stream(completion_id, desk, result)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(chat_answer(completion_id, desk, result))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"object": "model", "created": STARTED, "owned_by": "tickettune", **desks.describe(name)}
            for name in desks.names()]})

    @app.post("/v1/admin/desks", status_code=201)
    async def add_desk(request: Request) -> JSONResponse:
        name, folder = parse_new_desk(parse_json(await request.body()))
        try:
            await asyncio.to_thread(desks.add_folder, name, folder)  # reads its metadata; it loads on first use
        except DeskError as exc:
            raise ApiError(exc.status, str(exc), "name" if exc.status == 409 else "weights") from None
        return JSONResponse({"object": "model", "created": int(time.time()), "owned_by": "tickettune",
                             **desks.describe(name)}, 201)

    @app.get("/")
    async def page() -> Response:
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @app.get("/page.js")
    async def page_script() -> Response:
        return Response(PAGE_SCRIPT, media_type="text/javascript", headers=PAGE_HEADERS)

