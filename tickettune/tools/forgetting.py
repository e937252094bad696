"""`tickettune forgetting`: did the adapters cost the base model its general ability?

Scores multiple-choice questions (ARC-Easy's shape: `centerpiece`, `options`, `correct_options_idx`)
zero-shot, as lm-eval-style harnesses do: the prompt `Question: …\\nAnswer:`, each option as the
continuation ` <option>`, scored by its summed log-likelihood (`acc`) and by that sum divided by the
option's length in bytes (`acc_norm`). The base model, then each adapter of a weights folder, on
the same questions; each adapter's change in accuracy comes with a paired 95 % confidence interval
(normal approximation over the per-question differences, which are -1, 0 or 1). Every model runs
in the precision `predict` uses (bf16 autocast where the CPU has it), so the comparison is paired.

    tickettune forgetting --weights runs/weights --data ../shared/datasets/arc-easy/test.jsonl --limit 500 --json f.json

The question's tokens run once per model, its options share that KV cache (`likelihood`). It does
not measure in-domain quality (that is `tickettune eval`) and does not train anything.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("tickettune")
EXIT_BAD_INPUT = 2
WARN_DROP = 0.02  # an adapter that loses more than this, with a CI excluding 0, is flagged


@dataclass(frozen=True)
class Question:
    text: str
    options: tuple[str, ...]
    answer: int


def load_questions(path: str | Path, limit: int = 0) -> list[Question]:
    """The first `limit` (0: all) questions of a JSONL file; every problem at once, with file and line."""
    from tickettune.pipeline.data import DataError, read_jsonl

    rows = read_jsonl(path, {"centerpiece": str, "options": list, "correct_options_idx": list})
    problems, questions = [], []
    for n, row in rows[:limit or None]:
        options, answers = row["options"], row["correct_options_idx"]
        if len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
            problems.append(f"{path}:{n}: field 'options' must be a list of >= 2 non-empty strings")
        elif len(answers) != 1 or not isinstance(answers[0], int) or not 0 <= answers[0] < len(options):
            problems.append(f"{path}:{n}: field 'correct_options_idx' must hold one index into 'options'")
        else:
            questions.append(Question(row["centerpiece"], tuple(options), answers[0]))
    if problems:
        raise DataError(problems)
    return questions


def encode(tokenizer, question: Question) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and each option's continuation ids: the option's tokens are those the whole text
    has beyond the prompt's (the split lm-eval uses, robust to merges at the boundary).

    >>> class Chars:
    ...     def encode(self, text, add_special_tokens=False): return [ord(c) for c in text]
    >>> prompt, options = encode(Chars(), Question("Why?", ("A", "Bc"), 0))
    >>> len(prompt), options
    (22, [[32, 65], [32, 66, 99]])
    """
    context = f"Question: {question.text}\nAnswer:"
    prompt = tokenizer.encode(context, add_special_tokens=False)
    options = []
    for option in question.options:
        whole = tokenizer.encode(f"{context} {option}", add_special_tokens=False)
        options.append(whole[len(prompt):] or whole[-1:])
    return prompt, options


def accuracy(scores: list[np.ndarray], questions: list[Question]) -> tuple[np.ndarray, np.ndarray]:
    """Per question, 1.0 where the highest-scoring option is the answer: by summed log-likelihood,
    and by log-likelihood per byte of the option (` ` included, as lm-eval counts it).

    >>> q = [Question("q", ("a", "longer"), 1)]
    >>> [a.tolist() for a in accuracy([np.array([-2.0, -3.0])], q)]
    [[0.0], [1.0]]
    """
    acc = [float(np.argmax(s) == q.answer) for s, q in zip(scores, questions)]
    lengths = [np.array([len((" " + o).encode("utf-8")) for o in q.options]) for q in questions]
    norm = [float(np.argmax(s / n) == q.answer) for s, n, q in zip(scores, lengths, questions)]
    return np.array(acc), np.array(norm)


def paired_ci95(adapter: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """95 % confidence interval of mean(adapter - base) over the same questions (normal approximation).

    >>> paired_ci95(np.array([1.0, 1.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0, 1.0]))
    (0.0, 0.0)
    """
    d = adapter - base
    half = 1.96 * (float(np.std(d, ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0)
    return round(float(d.mean()) - half, 4), round(float(d.mean()) + half, 4)


def summarise(base: tuple[np.ndarray, np.ndarray], adapters: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """The JSON the command writes: base and per-adapter accuracy, each adapter's change and CI."""
    out = {"questions": len(base[0]), "base": {"acc": round(float(base[0].mean()), 4),
                                               "acc_norm": round(float(base[1].mean()), 4)}, "adapters": {}}
    for name, (acc, norm) in adapters.items():
        out["adapters"][name] = {"acc": round(float(acc.mean()), 4), "acc_norm": round(float(norm.mean()), 4),
                                 "delta_acc": round(float((acc - base[0]).mean()), 4),
                                 "ci95": list(paired_ci95(acc, base[0]))}
    return out


def warnings_for(summary: dict) -> list[str]:
    """A warning per adapter that lost more than WARN_DROP accuracy with a CI that excludes 0."""
    return [f"the {name} adapter lost {-a['delta_acc']:.3f} accuracy (95% CI {a['ci95'][0]:+.3f} to "
            f"{a['ci95'][1]:+.3f}): it costs the base model general ability"
            for name, a in summary["adapters"].items() if a["delta_acc"] < -WARN_DROP and a["ci95"][1] < 0]


def format_table(summary: dict) -> str:
    seconds = summary.get("seconds", {})
    lines = [f"{summary['questions']} questions, zero-shot, option log-likelihood",
             "| model | acc | acc_norm | delta acc (95% CI) | seconds |", "| --- | --- | --- | --- | --- |",
             f"| base | {summary['base']['acc']:.3f} | {summary['base']['acc_norm']:.3f} | - | "
             f"{seconds.get('base', float('nan')):.0f} |"]
    for name, a in summary["adapters"].items():
        lines.append(f"| + {name} adapter | {a['acc']:.3f} | {a['acc_norm']:.3f} | {a['delta_acc']:+.3f} "
                     f"({a['ci95'][0]:+.3f} to {a['ci95'][1]:+.3f}) | {seconds.get(name, float('nan')):.0f} |")
    return "\n".join(lines)


def score_models(model, questions: list[Question], batch_size: int) -> tuple[dict, dict[str, float]]:
    """Accuracies of the base model and of each adapter of a `TicketModel`, and seconds per model."""
    from tickettune.pipeline import modeling
    from tickettune.pipeline.likelihood import continuation_logprobs

    net = model.language_model()  # a lean load leaves the LM out until it is needed
    encoded = [encode(model.tokenizer, q) for q in questions]
    # batches of similar lengths waste little on padding; the scores go back to question order
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), max(map(len, encoded[i][1]))))
    prompts, options = [encoded[i][0] for i in order], [encoded[i][1] for i in order]
    names = [n for n in (modeling.INTENT_ADAPTER, modeling.REPLY_ADAPTER) if n in net.peft_config]
    runs = {"base": net.disable_adapter()} | {n: modeling.adapter(net, n) for n in names}
    results, seconds = {}, {}
    for name, context in runs.items():
        t0 = time.perf_counter()
        with context, modeling.autocast(model.plan):
            sorted_scores = continuation_logprobs(net, prompts, options, model.tokenizer.pad_token_id,
                                                  batch_size, desc=f"forgetting {name}")
        scores = [np.empty(0)] * len(questions)
        for i, s in zip(order, sorted_scores):
            scores[i] = s
        results[name], seconds[name] = accuracy(scores, questions), time.perf_counter() - t0
        log.info("%s: acc %.3f (%.0f s)", name, results[name][0].mean(), seconds[name])
    named = {("intent" if n == modeling.INTENT_ADAPTER else n): results[n] for n in names}
    return summarise(results["base"], named), {("intent" if k == modeling.INTENT_ADAPTER else k): v
                                                for k, v in seconds.items()}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="weights folder written by run.py")
    parser.add_argument("--data", required=True, help="multiple-choice JSONL (centerpiece, options, correct_options_idx)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default 16)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: a GPU when there is one")
    parser.add_argument("--json", metavar="OUT", help="also write the summary as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true")


def main(args: argparse.Namespace) -> int:
    from tickettune.pipeline import runlog
    from tickettune.pipeline.data import DataError
    from tickettune.pipeline.ticket_model import TicketModel
    from tickettune.pipeline.weights_folder import WeightsError, read_metadata

    runlog.setup(args.verbose)
    try:
        questions = load_questions(args.data, args.limit)
        read_metadata(Path(args.weights))
    except (DataError, WeightsError) as exc:
        log.error("cannot start:\n%s", exc)
        return EXIT_BAD_INPUT
    model = TicketModel.load(args.weights, device=args.device)
    summary, seconds = score_models(model, questions, args.batch_size)
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    summary["warnings"] = warnings_for(summary)
    print(format_table(summary))
    for warning in summary["warnings"]:
        log.warning("%s", warning)
    if args.json:
        from tickettune.pipeline.results import write_json_atomic

        write_json_atomic(args.json, summary)
    return 0
