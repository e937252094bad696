"""The log never shows a secret (README: "never printed"): `runlog.setup` installs a filter that replaces
the value of OPENAI_API_KEY, HF_TOKEN or HUGGING_FACE_HUB_TOKEN, wherever it appears in a log line, by the
variable's name. What is not such a value stays as it was."""

import io
import logging

import pytest

from tickettune.pipeline import runlog

KEY = "sk-proj-Zq81mXcV0rT5yHb2LwA9"


class FakeTTY(io.StringIO):
    """Stands for stderr; a terminal, so `setup` leaves the transformers progress bars alone."""

    def isatty(self):
        return True


@pytest.fixture
def logged(monkeypatch):
    """Install run.py's log setup on a captured stderr; give back a function that returns what it wrote.
    The root logger's handlers and every logger's level are restored afterwards."""
    for var in runlog.SECRET_VARS:
        monkeypatch.delenv(var, raising=False)
    stream = FakeTTY()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quieted = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    runlog.setup(verbose=True)
    yield stream.getvalue
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in set(logging.root.manager.loggerDict) - set(quieted):
        quieted[name] = logging.NOTSET
    for name, old in quieted.items():
        logging.getLogger(name).setLevel(old)


@pytest.mark.parametrize("var", runlog.SECRET_VARS)
def test_a_secret_as_an_argument_is_replaced_by_its_name(logged, monkeypatch, var):
    monkeypatch.setenv(var, KEY)
    logging.getLogger("tickettune.tools.judge").info("judge: calling with api_key=%s", KEY)
    out = logged()
    assert KEY not in out
    assert f"judge: calling with api_key=<{var}>" in out


@pytest.mark.parametrize("line", [
    f"Authorization: Bearer {KEY}",                                   # a header in a request dump
    f"headers={{'Authorization': 'Bearer {KEY}'}} status=401",
    f"openai.AuthenticationError: Incorrect API key provided: {KEY}. You can find your key at ...",
    f"{KEY}{KEY}",                                                    # twice, back to back
], ids=["bearer-header", "headers-dict", "sdk-error", "twice"])
def test_a_secret_inside_the_message_itself_is_replaced(logged, monkeypatch, line):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    logging.getLogger("tickettune").warning(line)
    out = logged()
    assert KEY not in out and "<OPENAI_API_KEY>" in out
    assert "sk-proj-" not in out  # not a partial replacement either


def test_every_level_and_every_logger_is_filtered(logged, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", KEY)
    for name in ("tickettune", "tickettune.pipeline.modeling", "some.library"):
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            logging.getLogger(name).log(level, "token %s", KEY)
    out = logged()
    assert KEY not in out and out.count("token <HF_TOKEN>") == 12


def test_what_is_not_a_secret_is_kept(logged, monkeypatch):
    """Other text on the line, other variables' values, a key only similar to the secret, and a value too
    short to redact safely (`api_key="none"`, as the README's client example uses) are left alone."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("TICKETTUNE_SEED", "123456789")
    log = logging.getLogger("tickettune")
    log.info("train ... seed %s, 50 %% done, key %s", "123456789", KEY[:-1] + "X")
    log.info("%-14s %7.1f s  (total %.1f s)", "predict", 1.4, 215.5)
    out = logged()
    assert "train ... seed 123456789, 50 % done, key " + KEY[:-1] + "X" in out
    assert "predict           " in out and "1.4 s  (total 215.5 s)" in out
    assert "<OPENAI_API_KEY>" not in out


def test_a_short_value_is_not_treated_as_a_secret(logged, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    logging.getLogger("tickettune").info("none of the 50 rows needed the judge")
    assert "none of the 50 rows needed the judge" in logged()


def test_a_secret_in_a_logged_traceback_is_replaced(logged, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    try:
        raise RuntimeError(f"Incorrect API key provided: {KEY}")
    except RuntimeError:
        logging.getLogger("tickettune").exception("judge failed")
    assert KEY not in logged()
