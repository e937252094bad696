"""`tickettune serve`: saved models behind an HTTP API (its own and OpenAI's shape) and a triage page.

    tickettune serve --weights runs/weights [--host 127.0.0.1] [--port 8000] [--max-batch 16]
    tickettune serve --desk north=runs/north --desk quill=runs/quill [--max-loaded-desks 8]
    tickettune serve --desk north=runs/north --ray --replicas 2

Owns the HTTP side of prediction; `TicketModel` (tickettune.pipeline) classifies and answers. Its parts:

    app.py       the routes (listed there) over a backend: this process's model thread, or Ray Serve
    schemas.py   request validation (400 naming the field), OpenAI's error and answer shapes, streaming
    batching.py  micro-batching of concurrent requests per desk onto one model thread, back-pressure (503)
    desks.py     the desks served: name -> weights folder, loaded on first use, LRU-bounded
    guard.py     API keys and the body limit (ASGI middleware)
    cli.py       the command: flags, start-up checks (exit 2 before binding), uvicorn, signals
    ray_app.py   the same app on Ray Serve: replicas, desks multiplexed, `@serve.batch`
    page.html, page.js   the triage page (no external resources; asks for the API key when needed)
"""

from tickettune.tools.serve.app import PAGE, PAGE_HEADERS, PAGE_SCRIPT, LocalBackend, create_app
from tickettune.tools.serve.batching import Batcher, ModelFailure, Predictor, Settings
from tickettune.tools.serve.cli import EXIT_BAD_INPUT, configure, main
from tickettune.tools.serve.desks import PREDICTOR_HOOK_ENV, Desk, DeskError, Desks
from tickettune.tools.serve.guard import ADMIN_KEY_ENV, API_KEY_ENV
from tickettune.tools.serve.schemas import ApiError, Result

__all__ = ["ADMIN_KEY_ENV", "API_KEY_ENV", "EXIT_BAD_INPUT", "PAGE", "PAGE_HEADERS", "PAGE_SCRIPT",
           "PREDICTOR_HOOK_ENV", "ApiError", "Batcher", "Desk", "DeskError", "Desks", "LocalBackend",
           "ModelFailure", "Predictor", "Result", "Settings", "configure", "create_app", "main"]
