"""`tickettune` console command: predict, serve, eval, forgetting, repro, plan, package. Training and
prediction in one go is `run.py`.

Each subcommand lives in its own module, which exposes `configure(parser)` and `main(args) -> int`;
modules are imported only when their command runs, so `tickettune plan` starts in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "predict": ("tickettune.tools.predict", "classify and answer tickets with a saved model (no retraining)"),
    "serve": ("tickettune.tools.serve", "serve a saved model over HTTP (its own API, OpenAI's, and a triage page)"),
    "eval": ("tickettune.tools.grade", "score a results file against labels the way the grader does"),
    "repro": ("tickettune.tools.repro", "run a command twice and check the predictions are byte-identical"),
    "plan": ("tickettune.tools.plan", "print the hardware plan (model, dtype, method) without loading anything"),
    "forgetting": ("tickettune.tools.forgetting", "the adapters against their base model on general multiple-choice questions"),
    "package": ("tickettune.tools.package", "build and validate the submission zip"),
}


def main(argv: list[str] | None = None) -> int:
    from tickettune.pipeline.runlog import set_process_defaults

    set_process_defaults()  # before any command imports torch
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tickettune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:  # configure only the command being run (imports stay lazy)
            importlib.import_module(module_name).configure(p)
    args = parser.parse_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).main(args)


if __name__ == "__main__":
    raise SystemExit(main())
