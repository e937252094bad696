"""`tickettune serve --ray`: the same app on Ray Serve, past one process (and, joined to a cluster, one machine).

Two deployments:
- `Ingress` (one replica): the FastAPI app of `app.create_app`, whole (routes, validation, keys, body
  limit, the page), with a `RayBackend` instead of the local model thread. It knows the desks (names,
  intents, folders) and sends each request to the model deployment. When there are more desks than a replica
  holds (`--max-loaded-desks`), the desk goes as the multiplexed model id, so Ray's router prefers a replica
  that has it loaded; otherwise every replica holds every desk, and the plain router spreads the load (model
  affinity would send a hot desk's every request to the one replica that loaded it first: measured, 2 replicas
  then did no better than one).
- `DeskModels` (`--replicas N`, `--replica-cpus` each): each replica loads desks on first use
  (`@serve.multiplexed`, LRU at `--max-loaded-desks`, one copy of each base model per replica) and gathers
  concurrent requests with `@serve.batch` (`--max-batch` requests, `--max-wait-ms`), a batch split per desk,
  predicted on the replica's one model thread. A request that fails in a batch is retried alone, so only the
  failing one gets a 500. Beyond `--max-queue` requests waiting at the replicas, Ray refuses
  (`BackPressureError`): a 503 with Retry-After, as on one process.

    tickettune serve --desk north=runs/north --desk quill=runs/quill --ray --replicas 2 --replica-cpus 1

A local Ray runtime starts with `replicas x replica-cpus` CPUs plus one for the ingress and the proxy, a
200 MB object store, no dashboard; `TICKETTUNE_RAY_ADDRESS` joins a running cluster instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tickettune.pipeline.data import Ticket
from tickettune.tools.ray_runtime import start_ray
from tickettune.tools.serve.batching import ModelFailure, Settings, answer, check_size
from tickettune.tools.serve.desks import PREDICTOR_HOOK_ENV, Desk, Desks, hooked_loader
from tickettune.tools.serve.schemas import ApiError, Result

log = logging.getLogger("tickettune.serve")
APP_NAME = "tickettune"


def desk_table(desks: Desks) -> list[tuple[str, str | None, list[str], str | None]]:
    """What a replica needs to rebuild the desks: (name, folder, intents, base model) each."""
    return [(d.name, str(d.folder) if d.folder else None, list(d.labels), d.base)
            for d in map(desks.entry, desks.names())]


def rebuild(table: list, max_loaded: int, device: str | None, hook: str | None) -> Desks:
    desks = Desks(max_loaded, device)
    for name, folder, labels, base in table:
        if hook:
            desks.add(Desk(name, hooked_loader(hook, []), labels=labels, base=base))
        else:
            desks.add_folder(name, folder)
    return desks


def model_deployment(settings: Settings):
    """The `DeskModels` deployment class, with the multiplexing and batching bounds of `settings`."""
    from ray import serve

    @serve.deployment(name="DeskModels")
    class DeskModels:
        def __init__(self, table: list, device: str | None, hook: str | None) -> None:
            self.desks = rebuild(table, settings.max_loaded_desks, device, hook)
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tickettune-model")
            self._batched.set_max_batch_size(settings.max_batch)
            self._batched.set_batch_wait_timeout_s(settings.max_wait_s)
            for name in self.desks.names()[:settings.max_loaded_desks]:  # ready when healthy, as on one process
                self.desks.get(name)

        @serve.multiplexed(max_num_models_per_replica=settings.max_loaded_desks)
        async def desk(self, name: str) -> str:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.desks.get, name)
            return name

        async def predict(self, desk: str, folder: str | None, tickets: list[Ticket]) -> list:
            if desk not in self.desks.names():  # added through the admin route after this replica started
                self.desks.add_folder(desk, folder)
            await self.desk(desk)
            outcome = await self._batched((desk, tickets))
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
        async def _batched(self, requests: list[tuple[str, list[Ticket]]]) -> list:
            loop = asyncio.get_running_loop()
            out: list = [None] * len(requests)
            for desk in dict.fromkeys(d for d, _ in requests):
                mine = [i for i, (d, _) in enumerate(requests) if d == desk]
                tickets = [t for i in mine for t in requests[i][1]]
                try:
                    results = await loop.run_in_executor(self.executor, lambda: answer(self.desks.get(desk), tickets))
                except Exception:  # noqa: BLE001 - isolate: each request again on its own
                    for i in mine:
                        try:
                            out[i] = await loop.run_in_executor(
                                self.executor, lambda i=i: answer(self.desks.get(desk), requests[i][1]))
                        except Exception as exc:  # noqa: BLE001 - this request's failure
                            log.exception("request failed in the model")
                            out[i] = ModelFailure(f"the model failed on this request ({type(exc).__name__}); "
                                                  "the server goes on")
                    continue
                start = 0
                for i in mine:
                    out[i] = results[start:start + len(requests[i][1])]
                    start += len(requests[i][1])
            return out

    return DeskModels


class RayBackend:
    """`app.Backend` on Ray Serve: the desk table here, the models in `DeskModels` replicas."""

    def __init__(self, handle, desks: Desks, settings: Settings, replicas: int) -> None:
        self.handle, self.desks, self.settings, self.replicas = handle, desks, settings, replicas
        self.stats = {"requests": 0, "tickets": 0, "failed_requests": 0}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def submit(self, desk: str, tickets: list[Ticket]) -> list[Result]:
        from ray.serve.exceptions import BackPressureError

        check_size(tickets, self.settings)
        if not tickets:
            return []
        arrived = time.monotonic()
        folder = self.desks.entry(desk).folder
        handle = self.handle
        if len(self.desks.names()) > self.settings.max_loaded_desks:  # not every replica can hold every desk
            handle = handle.options(multiplexed_model_id=desk)
        try:
            answered = await handle.predict.remote(desk, str(folder) if folder else None, tickets)
        except BackPressureError:
            raise ApiError(503, "every replica's queue is full: retry later", headers={"Retry-After": "2"}) from None
        except Exception as exc:  # noqa: BLE001 - a replica's failure is this request's, not the server's
            self.stats["failed_requests"] += 1
            if isinstance(exc, ModelFailure):  # Ray's task error is also an instance of the replica's exception
                raise ModelFailure(str(exc).strip().splitlines()[-1].split(": ", 1)[-1]) from None
            log.error("request failed on a replica: %s", str(exc).splitlines()[0][:300])
            raise ModelFailure(f"the model failed on this request ({type(exc).__name__}); the server goes on") from None
        self.stats["requests"] += 1
        self.stats["tickets"] += len(tickets)
        latency = int(round((time.monotonic() - arrived) * 1000))
        return [Result(p, d, latency, n) for p, d, n in answered]

    def health(self) -> tuple[int, dict]:
        return 200, {"status": "ok", "desks": self.desks.names(), "replicas": self.replicas, "ray": True,
                     **self.stats}


def ingress_deployment():
    from ray import serve

    @serve.deployment(name="Ingress")
    @serve.ingress()
    class Ingress:
        def __init__(self, models, table: list, settings: Settings, replicas: int, api_key: str | None,
                     admin_key: str | None) -> None:
            desks = Desks(settings.max_loaded_desks)
            for name, folder, labels, base in table:
                desks.add(Desk(name, lambda key: None, Path(folder) if folder else None, labels, base))
            self.backend = RayBackend(models, desks, settings, replicas)
            self.settings, self.api_key, self.admin_key = settings, api_key, admin_key

        def __serve_build_asgi_app__(self):
            from tickettune.tools.serve.app import create_app

            return create_app(settings=self.settings, api_key=self.api_key, backend=self.backend,
                              admin_key=self.admin_key)

    return Ingress


def application(desks: Desks, settings: Settings, *, replicas: int, replica_cpus: float, device: str | None,
                api_key: str | None, admin_key: str | None, hook: str | None = None):
    """The bound Ray Serve application (for `serve.run`)."""
    table = desk_table(desks)
    models = model_deployment(settings).options(
        num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max(2 * settings.max_batch, 8), max_queued_requests=settings.max_queue)
    ingress = ingress_deployment().options(ray_actor_options={"num_cpus": 0.25})
    return ingress.bind(models.bind(table, device, hook), table, settings, replicas, api_key, admin_key)


def serve_on_ray(args: argparse.Namespace, desks: Desks, settings: Settings, api_key: str | None,
                 admin_key: str | None) -> int:
    """Run the app on Ray Serve until SIGTERM/SIGINT; 0 on a clean stop."""
    from ray import serve

    start_ray(args.replicas * args.replica_cpus + 1)
    serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.set())
    app = application(desks, settings, replicas=args.replicas, replica_cpus=args.replica_cpus, device=args.device,
                      api_key=api_key, admin_key=admin_key, hook=os.environ.get(PREDICTOR_HOOK_ENV))
    t0 = time.monotonic()
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    log.info("serving %s on Ray Serve at http://%s:%d (%d replicas x %g CPUs, ready in %.0f s)",
             ", ".join(desks.names()), args.host, args.port, args.replicas, args.replica_cpus, time.monotonic() - t0)
    while not stopping.wait(0.5):
        pass
    log.info("stopping Ray Serve")
    serve.shutdown()
    import ray

    ray.shutdown()
    return 0
