"""Micro-batching: the tickets of concurrent requests, gathered per desk, onto one model worker thread.

The first ticket waiting opens a batch; the batch goes to the model once it holds `max_batch` tickets of
that ticket's desk or the first has waited `max_wait_s`. A batch never mixes desks: tickets of other desks
keep their place in the queue. At most `max_queue` tickets wait (a request that does not fit is refused
whole: 503 with Retry-After). When a batch mixing several requests fails, each request is predicted
again on its own, so that only the one that fails gets the error. Everything that touches a model runs on
the one worker thread (`TicketModel.predict` is not thread-safe, and desks share base models).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tickettune.pipeline.data import Ticket
from tickettune.pipeline.results import Prediction
from tickettune.tools.serve.schemas import ApiError, Result

log = logging.getLogger("tickettune.serve")


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
    max_body: int = 1_000_000       # bytes (1 MB)
    model_name: str = "tickettune"  # the desk's name when one model is served by `--weights`
    max_loaded_desks: int = 8       # desks loaded at once; the least recently used one is unloaded beyond

    def __post_init__(self) -> None:
        for name, value, low in (("max_batch", self.max_batch, 1), ("max_queue", self.max_queue, 1),
                                 ("max_body", self.max_body, 1), ("max_wait_s", self.max_wait_s, 0),
                                 ("max_loaded_desks", self.max_loaded_desks, 1)):
            if not value >= low:
                raise ValueError(f"{name} must be >= {low}, got {value}")


class ModelFailure(RuntimeError):
    """The model raised while predicting this request's tickets (logged with its traceback)."""


@dataclass
class _Item:
    desk: str
    ticket: Ticket
    request: int                # which request it came from: a failing batch is retried per request
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


def answer(predictor: Predictor, tickets: list[Ticket]) -> list[tuple[Prediction, dict, int]]:
    """The predictor's answer for `tickets`, checked, with each reply's token count (0 without a tokenizer)."""
    predictions, diagnostics = predictor.predict(tickets)
    if len(predictions) != len(tickets) or len(diagnostics) != len(tickets):
        raise RuntimeError(f"the predictor answered {len(predictions)} predictions and {len(diagnostics)} "
                           f"diagnostics for {len(tickets)} tickets")
    tokenizer = getattr(predictor, "tokenizer", None)
    counts = [len(tokenizer(p.prediction, add_special_tokens=False)["input_ids"]) if tokenizer else 0
              for p in predictions]
    return list(zip(predictions, diagnostics, counts))


def check_size(tickets: list[Ticket], settings: Settings) -> None:
    """A request of more tickets than the queue holds is refused whole (413), whatever the backend."""
    if len(tickets) > settings.max_queue:
        raise ApiError(413, f"tickets: {len(tickets)} tickets in one request, at most {settings.max_queue} "
                            "(the server's --max-queue)", "tickets")


class Batcher:
    """See the module. `predictor_of(desk)` is called on the model thread for each batch."""

    def __init__(self, settings: Settings, predictor_of: Callable[[str], Predictor]) -> None:
        self.settings = settings
        self.predictor_of = predictor_of
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

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="tickettune-batcher")

    async def on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the model thread (loading a desk, for one)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

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

    async def submit(self, desk: str, tickets: list[Ticket]) -> list[Result]:
        """The results of `tickets` on `desk`, in order. Raises `ApiError` 413/503 when they do not fit in
        the queue, `ModelFailure` when the model fails on them."""
        check_size(tickets, self.settings)
        if len(self._pending) + len(tickets) > self.settings.max_queue:
            raise ApiError(503, f"the queue is full ({len(self._pending)} of {self.settings.max_queue} tickets "
                                "waiting): retry later", headers={"Retry-After": str(self.retry_after())})
        if not tickets:
            return []
        self._requests += 1
        loop = asyncio.get_running_loop()
        items = [_Item(desk, t, self._requests, loop.create_future()) for t in tickets]
        self._pending.extend(items)
        self._wakeup.set()
        outcomes = await asyncio.gather(*(i.future for i in items), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    async def _run(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            desk = self._pending[0].desk
            deadline = self._pending[0].arrived + self.settings.max_wait_s
            while self._waiting(desk) < self.settings.max_batch and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), left)
            batch = self._take(desk)
            if batch:
                try:
                    await self._predict_batch(desk, batch)
                except Exception as exc:  # noqa: BLE001 - the worker must outlive any one batch
                    log.exception("batch failed outside the model")
                    self._fail(batch, exc)

    def _waiting(self, desk: str) -> int:
        return sum(1 for i in self._pending if i.desk == desk)

    def _take(self, desk: str) -> list[_Item]:
        """Up to `max_batch` of `desk`'s waiting tickets, oldest first; the others keep their places.
        A request cancelled while waiting is dropped, not predicted."""
        batch, rest = [], deque()
        while self._pending:
            item = self._pending.popleft()
            if item.future.done():
                continue
            (batch if item.desk == desk and len(batch) < self.settings.max_batch else rest).append(item)
        self._pending = rest
        return batch

    async def _predict_batch(self, desk: str, batch: list[_Item]) -> None:
        t0 = time.monotonic()
        waited_ms = (t0 - batch[0].arrived) * 1000
        requests = sorted({i.request for i in batch})
        failure = await self._attempt(desk, batch)
        if failure is not None and len(requests) == 1:
            self._fail(batch, failure)
        elif failure is not None:  # isolate: each request again on its own, so only the failing one fails
            log.warning("batch of %d tickets from %d requests failed (%s): predicting each request alone",
                        len(batch), len(requests), type(failure).__name__)
            for request in requests:
                part = [i for i in batch if i.request == request]
                if (failure := await self._attempt(desk, part)) is not None:
                    self._fail(part, failure)
        seconds = time.monotonic() - t0
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        self.stats["batches"] += 1
        self.stats["tickets"] += len(batch)
        log.info("batch %d: %d tickets from %d requests (desk %s) in %.0f ms (first waited %.0f ms), %d queued",
                 self.stats["batches"], len(batch), len(requests), desk, seconds * 1000, waited_ms, len(self._pending))

    async def _attempt(self, desk: str, items: list[_Item]) -> Exception | None:
        """Predict `items` on the model thread and deliver the results; the exception, if it fails."""
        try:
            results = await self.on_model_thread(lambda: answer(self.predictor_of(desk), [i.ticket for i in items]))
        except Exception as exc:  # noqa: BLE001 - any failure of the model is this request's, not the server's
            return exc
        now = time.monotonic()
        for item, (prediction, diagnostics, n_tokens) in zip(items, results):
            if not item.future.done():
                item.future.set_result(Result(prediction, diagnostics, int(round((now - item.arrived) * 1000)),
                                              n_tokens))
        return None

    def _fail(self, items: list[_Item], exc: Exception) -> None:
        log.error("request failed in the model (%d tickets: %s)", len(items),
                  ", ".join(repr(i.ticket.id) for i in items[:5]) + (" ..." if len(items) > 5 else ""),
                  exc_info=(type(exc), exc, exc.__traceback__))
        self.stats["failed_requests"] += len({i.request for i in items})
        failure = ModelFailure(f"the model failed on this request ({type(exc).__name__}); the server goes on")
        for item in items:
            if not item.future.done():
                item.future.set_exception(failure)
