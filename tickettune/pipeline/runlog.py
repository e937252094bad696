"""Run logging: one readable line per stage with its wall-clock, on stderr, never a secret."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

log = logging.getLogger("tickettune")
SECRET_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class _Redact(logging.Filter):
    """Replace the value of any secret environment variable that reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:  # the traceback a handler would append, formatted
            record.exc_text = logging.Formatter().formatException(record.exc_info)  # once, so it can be cleaned
        for var in SECRET_VARS:
            value = os.environ.get(var)
            if not value or len(value) < 6:
                continue
            if value in message:
                record.msg, record.args = message.replace(value, f"<{var}>"), ()
            if record.exc_text and value in record.exc_text:
                record.exc_text = record.exc_text.replace(value, f"<{var}>")
            if record.stack_info and value in record.stack_info:
                record.stack_info = record.stack_info.replace(value, f"<{var}>")
        return True


def set_process_defaults() -> None:
    """Environment defaults that must be in place before torch starts (the user's values win):
    passive OpenMP waits (on 2 cores a spin-waiting thread pool slowed a forward pass ~20x under
    load), no tokenizer thread pool, deterministic cuBLAS workspaces."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def setup(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    handler.addFilter(_Redact())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "sentence_transformers", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sys.stderr.isatty():  # a log file gets the stage lines, not progress-bar redraws
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class Clock:
    """Stage timer: `with clock.stage("train"):` logs `train ... 12.3 s` and keeps the breakdown."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.stages: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.monotonic()
        log.info("%s ...", name)
        yield
        self.stages[name] = time.monotonic() - t0
        log.info("%-14s %7.1f s  (total %.1f s)", name, self.stages[name], self.elapsed())
