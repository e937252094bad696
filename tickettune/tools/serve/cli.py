"""The `tickettune serve` command: flags, start-up checks (exit 2 before binding), uvicorn or Ray Serve.

    tickettune serve --weights runs/weights                              one desk, named by --model-name
    tickettune serve --desk north=runs/north --desk quill=runs/quill     many desks, one base model in memory
    tickettune serve --desk north=runs/north --ray --replicas 2          the same app on a local Ray Serve

Test hook: `TICKETTUNE_SERVE_PREDICTOR=module:factory` makes the server call `factory()` for its one
predictor instead of loading `--weights` (for tests of the process: SIGTERM, logs).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from tickettune.tools.serve.batching import Settings
from tickettune.tools.serve.desks import PREDICTOR_HOOK_ENV, Desk, DeskError, Desks, hooked_loader
from tickettune.tools.serve.guard import ADMIN_KEY_ENV, API_KEY_ENV

log = logging.getLogger("tickettune.serve")
EXIT_BAD_INPUT = 2


def configure(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("what to serve (one of)")
    where.add_argument("--weights", help="weights folder written by run.py: one desk, named by --model-name")
    where.add_argument("--desk", action="append", default=[], metavar="NAME=WEIGHTS_DIR",
                       help="a desk and its weights folder (repeatable); the OpenAI `model` field names it")
    parser.add_argument("--model-name", default=Settings.model_name, help="the desk name of --weights")
    parser.add_argument("--max-loaded-desks", type=int, default=Settings.max_loaded_desks,
                        help=f"desks loaded at once; the least recently used is unloaded beyond (default "
                             f"{Settings.max_loaded_desks})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: a GPU when there is one")
    parser.add_argument("--max-batch", type=int, default=Settings.max_batch,
                        help=f"most tickets per model call (default {Settings.max_batch}; 1 = no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=Settings.max_wait_s * 1000,
                        help=f"how long a ticket waits for others to share its batch (default {Settings.max_wait_s * 1000:g})")
    parser.add_argument("--max-queue", type=int, default=Settings.max_queue,
                        help=f"most tickets waiting for the model; beyond, 503 + Retry-After (default {Settings.max_queue})")
    parser.add_argument("--max-body-bytes", type=int, default=Settings.max_body,
                        help=f"largest request body; beyond, 413 (default {Settings.max_body})")
    parser.add_argument("--graceful-timeout", type=float, default=60.0,
                        help="on SIGTERM, seconds in-flight requests get to finish (default 60)")
    ray = parser.add_argument_group("Ray Serve (pip install 'ray[serve]')")
    ray.add_argument("--ray", action="store_true", help="run the app on a local Ray Serve: replicas, multiplexed desks")
    ray.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also the model's own log lines per batch")


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000, max_queue=args.max_queue,
                    max_body=args.max_body_bytes, model_name=args.model_name, max_loaded_desks=args.max_loaded_desks)


def main(args: argparse.Namespace) -> int:
    from tickettune.pipeline import runlog

    runlog.setup(args.verbose)
    problems, api_key, admin_key = [], os.environ.get(API_KEY_ENV), os.environ.get(ADMIN_KEY_ENV)
    for env, value in ((API_KEY_ENV, api_key), (ADMIN_KEY_ENV, admin_key)):
        if value is not None and not value.strip():
            problems.append(f"{env} is set but empty: set a key, or unset it")
    problems += [f"{flag} {value}: must be >= {low}" for flag, value, low in (
        ("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
        ("--max-body-bytes", args.max_body_bytes, 1), ("--max-wait-ms", args.max_wait_ms, 0),
        ("--graceful-timeout", args.graceful_timeout, 0), ("--max-loaded-desks", args.max_loaded_desks, 1),
        ("--replicas", args.replicas, 1), ("--replica-cpus", args.replica_cpus, 0.01)) if not value >= low]
    if not 0 <= args.port <= 65535:
        problems.append(f"--port {args.port}: not a port number")
    desks = desks_of(args, problems)
    if problems:
        log.error("cannot start:\n%s", "\n".join(problems))
        return EXIT_BAD_INPUT
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without %s: anyone who can reach this port can use the model",
                    args.host, API_KEY_ENV)
    if args.ray:
        from tickettune.tools.serve.ray_app import serve_on_ray

        return serve_on_ray(args, desks, settings_of(args), api_key, admin_key)
    return serve_here(args, desks, settings_of(args), api_key, admin_key)


def serve_here(args: argparse.Namespace, desks: Desks, settings: Settings, api_key: str | None,
               admin_key: str | None) -> int:
    import uvicorn

    from tickettune.tools.serve.app import create_app

    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings=settings, api_key=api_key, on_load_failure=stop, desks=desks, admin_key=admin_key)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                                           server_header=False, timeout_graceful_shutdown=args.graceful_timeout))
    log.info("serving %s on http://%s:%d (max batch %d, max wait %g ms, max queue %d, API key %s)",
             ", ".join(desks.names()), args.host, args.port, settings.max_batch, settings.max_wait_s * 1000,
             settings.max_queue, "required" if api_key else "not required")
    # uvicorn finishes the in-flight requests on SIGTERM/SIGINT, then re-raises the signal to the handler
    # it found: these make that a normal exit (0) instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("stopped by signal %d", signum))
    server.run()
    if app.state.backend.load_error:
        return 1
    return 0 if server.started else 1


def desks_of(args: argparse.Namespace, problems: list[str]) -> Desks:
    """The desks the flags name, each folder checked now (problems are collected, not raised)."""
    desks = Desks(max(args.max_loaded_desks, 1), args.device)
    hook = os.environ.get(PREDICTOR_HOOK_ENV)
    if hook:
        desks.add(Desk(args.model_name, hooked_loader(hook, problems)))
        return desks
    pairs = ([(args.model_name, args.weights)] if args.weights else []) + [_pair(d, problems) for d in args.desk]
    if not pairs:
        problems.append("nothing to serve: give --weights DIR or --desk NAME=DIR")
    for name, folder in pairs:
        if name is None:
            continue
        try:
            desk = desks.add_folder(name, folder)
        except DeskError as exc:
            problems.append(str(exc))
            continue
        if (desk.base or "").startswith("bundled:"):
            os.environ["HF_HUB_OFFLINE"] = "1"  # the bundled model never touches a hub (as run.py)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("--device cuda: no GPU here")
    if not args.verbose:  # one line per batch: the model's own per-call lines only with -v
        logging.getLogger("tickettune.pipeline").setLevel(logging.WARNING)
    return desks


def _pair(flag: str, problems: list[str]) -> tuple[str | None, str]:
    name, sep, folder = flag.partition("=")
    if not sep or not name or not folder:
        problems.append(f"--desk {flag}: expected NAME=WEIGHTS_DIR")
        return None, ""
    return name, str(Path(folder))
