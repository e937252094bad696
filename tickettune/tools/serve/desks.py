"""The desks one server answers for: name -> weights folder, loaded on first use, at most N at once (LRU).

A desk is one support desk's trained model (a weights folder that run.py wrote), named by the OpenAI
`model` field or the `desk` field of `/v1/tickets`. Every folder is checked when it is added (the start,
or the admin route): its metadata must read (`weights_folder.read_metadata`) and its base model must be the
one the server's other desks use, so one copy of the base serves them all (`pipeline.bases`: a desk's
adapters, intent encoder and index are what it adds). Loading and unloading run on the model thread only
(the caller's business): the table itself is guarded by a lock, for the routes that read it.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tickettune.tools.serve.batching import Predictor
from tickettune.tools.serve.schemas import DESK_NAME, ApiError

log = logging.getLogger("tickettune.serve")
PREDICTOR_HOOK_ENV = "TICKETTUNE_SERVE_PREDICTOR"  # module:factory -> the one desk's predictor (tests of the process)


class DeskError(ValueError):
    """A desk that cannot be added (the message says which and why; `status`: 409 when the name is taken)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Desk:
    name: str
    load: Callable[[str], Predictor]   # called on the model thread with a key no other load had
    folder: Path | None = None         # None: a predictor given in code (tests, the hook)
    labels: list[str] = field(default_factory=list)  # its taxonomy, known before it loads
    base: str | None = None            # its base model's plan id; desks on one server share it


class Desks:
    """See the module. `get(name)` (model thread) returns the desk's predictor, loading it if needed."""

    def __init__(self, max_loaded: int = 8, device: str | None = None) -> None:
        self.max_loaded, self.device = max_loaded, device
        self._desks: dict[str, Desk] = {}
        self._loaded: OrderedDict[str, tuple[Predictor, str]] = OrderedDict()  # most recently used last
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        self._bases = None
        self.load_seconds: dict[str, float] = {}

    # --- the table -----------------------------------------------------------------------------

    def add(self, desk: Desk, ready: Predictor | None = None) -> None:
        """Serve `desk` from now on (`ready`: its predictor, already loaded)."""
        with self._lock:
            if not DESK_NAME.fullmatch(desk.name):
                raise DeskError(f"desk {desk.name!r}: a name is 1-64 letters, digits, '.', '_', '-'")
            if desk.name in self._desks:
                raise DeskError(f"desk {desk.name!r} exists already ({self._desks[desk.name].folder})", 409)
            bases = {d.base for d in self._desks.values() if d.base} - {None}
            if desk.base and bases and desk.base not in bases:
                raise DeskError(f"desk {desk.name!r} ({desk.folder}) was trained on {desk.base}, this server's "
                                f"desks on {', '.join(sorted(bases))}: serve it from another server")
            self._desks[desk.name] = desk
            if ready is not None:
                self._loaded[desk.name] = (ready, "")
        log.info("desk %s: %s, %d intents", desk.name, desk.folder or "in-process predictor", len(desk.labels))

    def add_folder(self, name: str, folder: str | Path) -> Desk:
        """A desk from a weights folder (checked now; its model loads on first use)."""
        from tickettune.pipeline.weights_folder import WeightsError, read_metadata

        folder = Path(folder)
        try:
            meta = read_metadata(folder)
        except WeightsError as exc:
            raise DeskError(f"desk {name!r}: {exc}") from None
        desk = Desk(name, lambda key: self._load_folder(folder, key), folder, list(meta.get("taxonomy", [])),
                    meta.get("plan", {}).get("model"))
        self.add(desk)
        return desk

    def names(self) -> list[str]:
        with self._lock:
            return list(self._desks)

    def entry(self, name: str) -> Desk:
        with self._lock:
            return self._desks[name]

    def describe(self, name: str) -> dict:
        with self._lock:
            desk, loaded = self._desks[name], self._loaded.get(name)
        labels = list(loaded[0].labels) if loaded else desk.labels
        return {"id": name, "intents": labels, "loaded": loaded is not None, "base_model": desk.base}

    def resolve(self, name: str | None, param: str) -> str:
        """The desk a request names (`param`: the field that named it), or the only one when it names none
        and the server has one. With one desk, any name is it (OpenAI clients send a `model` always)."""
        names = self.names()
        if len(names) == 1 and (name is None or param == "model"):
            return names[0]
        if name is None:
            raise ApiError(400, f"{param}: missing field (this server has {len(names)} desks: {', '.join(names)})",
                           param)
        if name not in names:
            raise ApiError(404, f"{param}: no desk named {name!r} (this server has: {', '.join(names)})", param)
        return name

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    # --- loading (model thread) ------------------------------------------------------------------

    def get(self, name: str) -> Predictor:
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name][0]
            desk = self._desks[name]
        t0 = time.monotonic()
        key = f"d{next(self._keys)}"
        predictor = desk.load(key)
        self.load_seconds[name] = round(time.monotonic() - t0, 2)
        log.info("desk %s loaded in %.1f s", name, self.load_seconds[name])
        with self._lock:
            self._loaded[name] = (predictor, key)
            evicted = []
            while len(self._loaded) > self.max_loaded:
                evicted.append(self._loaded.popitem(last=False))
        for gone, (_, gone_key) in evicted:
            if self._bases is not None:
                self._bases.release(gone_key)
            log.info("desk %s unloaded (least recently used; at most %d loaded)", gone, self.max_loaded)
        return predictor

    def _load_folder(self, folder: Path, key: str) -> Any:
        from tickettune.pipeline.bases import SharedBases
        from tickettune.pipeline.ticket_model import TicketModel

        if self._bases is None:
            self._bases = SharedBases()
        return TicketModel.load(folder, device=self.device, shared=self._bases, key=key)

    @property
    def bases(self):
        return self._bases


def hooked_loader(hook: str, problems: list[str]) -> Callable[[str], Predictor]:
    module_name, _, attr = hook.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        problems.append(f"{PREDICTOR_HOOK_ENV}={hook}: {exc}")
        return lambda key: None
    log.warning("%s=%s: serving that predictor, not --weights", PREDICTOR_HOOK_ENV, hook)

    def load(key: str) -> Predictor:
        t0 = time.monotonic()
        predictor = factory()
        log.info("model loaded in %.1f s", time.monotonic() - t0)
        return predictor

    return load
