"""The grader's published scoring rules, applied to a results file read by `results_file`.

Owns the scoring rules (pure functions, no model). It does not read the results file itself
(`results_file`: leniently, every problem collected), judge replies (`judge`), draw anything
(`report`), run the `eval` command (`grade`) or rerun jobs (`repro`).

The rules, exactly:

- Every labelled row counts. A label id with no prediction is wrong on everything: intent wrong,
  every check it is counted in fails, judge score 0. A duplicated prediction id is a problem and
  only its first occurrence is scored; a prediction id not in the labels is a problem, not scored.
- **intent_accuracy** over rows with `probe: false`, **probe_accuracy** over rows with
  `probe: true`: correct when `normalise_intent(predicted)` equals the normalised gold label or one
  of its normalised synonyms (`--synonyms`: a JSON object, label -> list of accepted alternatives;
  one-way, alternatives of label A are accepted only where A is gold).
- **must_mention**: each entry is alternatives separated by `|`; an entry matches when any
  alternative is a case-insensitive (`str.lower`) substring of the reply; empty alternatives are
  ignored. A row passes when every entry matches. Rows with no entries are excluded from
  **must_mention_rate** (passes / rows with at least one entry).
- **must_not_mention**: the row passes when no alternative of any entry appears (same matching).
  Every row counts in **must_not_mention_rate**, so a row with no entries passes (unless its
  prediction is missing).
- **reply_similarity**: mean judge score (0..1) over all rows; an empty or missing reply scores 0.
- **reply_score**: mean over all rows of `0.5 * judge + 0.5 * checks`, where `checks` is the mean
  of the row's counted check outcomes (1 pass, 0 fail): must_mention when the row has entries,
  and must_not_mention always. So a row with both kinds: 0.5*judge + 0.25*mm + 0.25*mnm;
  a row with no must_mention entries: 0.5*judge + 0.5*mnm.
- **efficiency**: 1.0 at `wall_clock_s` <= 600, 0.0 at >= 1800, linear between; 0.0 when
  `training.wall_clock_s` is missing or not a finite number.
- **composite** = 0.4*intent_accuracy + 0.3*reply_score + 0.2*probe_accuracy + 0.1*efficiency;
  a rate with no rows to count is reported as null and counts 0 in the composite.

    >>> efficiency(1200.0)
    0.5
    >>> mentions("See Settings > Billing", ["settings > billing|billing page", "seats"])
    ['seats']
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tickettune.pipeline.data import DataError, Label, TicketId
from tickettune.tools.results_file import ParsedResults, kind_of

WEIGHTS = {"intent_accuracy": 0.4, "reply_score": 0.3, "probe_accuracy": 0.2, "efficiency": 0.1}
FAST_S, SLOW_S = 600.0, 1800.0


# --- pure rules --------------------------------------------------------------------------------

def normalise_intent(label: str) -> str:
    """Lower case, no leading/trailing whitespace, inner whitespace runs collapsed to one space."""
    return " ".join(label.split()).lower()


def normalise_synonyms(synonyms: dict[str, list[str]] | None) -> dict[str, frozenset[str]]:
    """Gold label -> every accepted normalised answer (the label itself included)."""
    out: dict[str, set[str]] = {}
    for label, alternatives in (synonyms or {}).items():
        out.setdefault(normalise_intent(label), set()).update(normalise_intent(a) for a in alternatives)
    return {k: frozenset(v) for k, v in out.items()}


def intent_correct(predicted: str | None, gold: str, synonyms: dict[str, frozenset[str]]) -> bool:
    if not isinstance(predicted, str):
        return False
    p, g = normalise_intent(predicted), normalise_intent(gold)
    return p == g or p in synonyms.get(g, frozenset())


def _alternatives(entry: str) -> list[str]:
    return [a.strip().lower() for a in entry.split("|") if a.strip()]


def mentions(reply: str, entries: list[str] | tuple[str, ...]) -> list[str]:
    """The must_mention entries the reply misses (empty list: the row passes)."""
    text = reply.lower()
    return [e for e in entries if _alternatives(e) and not any(a in text for a in _alternatives(e))]


def forbidden_found(reply: str, entries: list[str] | tuple[str, ...]) -> list[str]:
    """The must_not_mention alternatives that appear in the reply (empty list: the row passes)."""
    text = reply.lower()
    return [a for e in entries for a in _alternatives(e) if a in text]


def efficiency(wall_clock_s: float | None) -> float:
    if wall_clock_s is None or not math.isfinite(wall_clock_s):
        return 0.0
    if wall_clock_s <= FAST_S:
        return 1.0
    if wall_clock_s >= SLOW_S:
        return 0.0
    return (SLOW_S - wall_clock_s) / (SLOW_S - FAST_S)


def composite(intent: float | None, reply: float | None, probe: float | None, eff: float | None) -> float:
    parts = {"intent_accuracy": intent, "reply_score": reply, "probe_accuracy": probe, "efficiency": eff}
    return sum(WEIGHTS[k] * (v or 0.0) for k, v in parts.items())


def row_reply_score(judge: float, must_mention_ok: bool | None, must_not_ok: bool) -> float:
    """0.5*judge + 0.5*mean(counted checks); must_mention_ok is None when the row has no entries."""
    checks = [must_not_ok] if must_mention_ok is None else [must_mention_ok, must_not_ok]
    return 0.5 * judge + 0.5 * sum(checks) / len(checks)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    """A JSON object, label -> list of accepted alternatives; every problem raised as one DataError."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise DataError([f"{path}: cannot read file ({exc.strerror or exc})"]) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError([f"{path}: not valid JSON ({exc})"]) from exc
    if not isinstance(obj, dict):
        raise DataError([f"{path}: expected an object label -> [alternatives], got {kind_of(obj)}"])
    problems = [f"{path}: '{k}' must map to a list of strings" for k, v in obj.items()
                if not isinstance(v, list) or not all(isinstance(a, str) for a in v)]
    if problems:
        raise DataError(problems)
    return obj


# --- scoring ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowScore:
    id: TicketId
    gold_intent: str
    predicted_intent: str | None  # None: no prediction, or not a string
    intent_ok: bool
    probe: bool
    reply: str | None  # None: no prediction, or not a string
    ideal_reply: str
    missing: bool  # no prediction row for this label id
    must_mention_missed: tuple[str, ...]  # entries the reply did not match
    must_mention_ok: bool | None  # None: the row has no must_mention entries (not counted)
    must_not_found: tuple[str, ...]  # forbidden alternatives that appear
    must_not_ok: bool
    judge: float
    judge_fallback: bool  # scored offline because the LLM judge stopped
    reply_score: float


@dataclass
class Evaluation:
    rows: list[RowScore]
    problems: list[str]
    wall_clock_s: float | None
    intent_accuracy: float | None
    probe_accuracy: float | None
    must_mention_rate: float | None
    must_not_mention_rate: float | None
    reply_similarity: float | None
    reply_score: float | None
    efficiency: float
    composite: float
    judge: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The `--json` object: metrics first, then counts, judge info and problems."""
        ordinary = [r for r in self.rows if not r.probe]
        probe = [r for r in self.rows if r.probe]
        return {
            "intent_accuracy": self.intent_accuracy,
            "probe_accuracy": self.probe_accuracy,
            "must_mention_rate": self.must_mention_rate,
            "must_not_mention_rate": self.must_not_mention_rate,
            "reply_similarity": self.reply_similarity,
            "reply_score": self.reply_score,
            "efficiency": self.efficiency,
            "composite": self.composite,
            "counts": {
                "rows": len(self.rows),
                "ordinary": len(ordinary),
                "ordinary_correct": sum(r.intent_ok for r in ordinary),
                "probe": len(probe),
                "probe_correct": sum(r.intent_ok for r in probe),
                "must_mention_rows": sum(r.must_mention_ok is not None for r in self.rows),
                "must_mention_passed": sum(r.must_mention_ok is True for r in self.rows),
                "must_not_mention_passed": sum(r.must_not_ok for r in self.rows),
                "missing_predictions": sum(r.missing for r in self.rows),
            },
            "wall_clock_s": self.wall_clock_s,
            "judge": self.judge,
            "problems": self.problems,
        }


def score(labels: list[Label], parsed: ParsedResults, judge_scores: list[float] | None = None,
          synonyms: dict[str, list[str]] | None = None, judge_fallback: list[bool] | None = None,
          judge_info: dict | None = None) -> Evaluation:
    """Apply every rule. `judge_scores[i]` (0..1) belongs to `labels[i]`; None scores every reply 0."""
    syn = normalise_synonyms(synonyms)
    judge_scores = judge_scores if judge_scores is not None else [0.0] * len(labels)
    judge_fallback = judge_fallback if judge_fallback is not None else [False] * len(labels)
    rows = []
    for label, judged, fell_back in zip(labels, judge_scores, judge_fallback, strict=True):
        pred = parsed.predictions.get(label.id)
        missing = pred is None
        pred = pred or {}
        intent = pred.get("predicted_intent") if isinstance(pred.get("predicted_intent"), str) else None
        reply = pred.get("prediction") if isinstance(pred.get("prediction"), str) else None
        if reply is None:  # no usable reply fails every check it is counted in
            missed = tuple(e for e in label.must_mention if _alternatives(e))
            found: tuple[str, ...] = ()
            mm_ok = False if missed else None
            mnm_ok = False
            judged = 0.0
        else:
            missed = tuple(mentions(reply, label.must_mention))
            found = tuple(forbidden_found(reply, label.must_not_mention))
            counted = any(_alternatives(e) for e in label.must_mention)
            mm_ok = (not missed) if counted else None
            mnm_ok = not found
        rows.append(RowScore(
            id=label.id, gold_intent=label.intent, predicted_intent=intent,
            intent_ok=intent_correct(intent, label.intent, syn), probe=label.probe,
            reply=reply, ideal_reply=label.ideal_reply, missing=missing,
            must_mention_missed=missed, must_mention_ok=mm_ok, must_not_found=found, must_not_ok=mnm_ok,
            judge=float(judged), judge_fallback=bool(fell_back),
            reply_score=row_reply_score(float(judged), mm_ok, mnm_ok),
        ))
    wall = parsed.training.get("wall_clock_s")
    intent = _mean([float(r.intent_ok) for r in rows if not r.probe])
    probe = _mean([float(r.intent_ok) for r in rows if r.probe])
    reply = _mean([r.reply_score for r in rows])
    eff = efficiency(wall)
    return Evaluation(
        rows=rows, problems=list(parsed.problems), wall_clock_s=wall,
        intent_accuracy=intent, probe_accuracy=probe,
        must_mention_rate=_mean([float(r.must_mention_ok) for r in rows if r.must_mention_ok is not None]),
        must_not_mention_rate=_mean([float(r.must_not_ok) for r in rows]),
        reply_similarity=_mean([r.judge for r in rows]), reply_score=reply,
        efficiency=eff, composite=composite(intent, reply, probe, eff), judge=judge_info or {},
    )


# --- output -------------------------------------------------------------------------------------

def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_table(ev: Evaluation, max_problems: int = 20) -> str:
    """The human-readable summary: one aligned metric table, the judge line, then problems."""
    c = ev.summary()["counts"]
    j = ev.judge
    wall = "missing" if ev.wall_clock_s is None else f"wall_clock_s {ev.wall_clock_s:.1f}"
    table = [
        ("intent_accuracy", ev.intent_accuracy, f"{c['ordinary_correct']}/{c['ordinary']} ordinary rows", "0.4"),
        ("probe_accuracy", ev.probe_accuracy, f"{c['probe_correct']}/{c['probe']} probe rows", "0.2"),
        ("must_mention_rate", ev.must_mention_rate,
         f"{c['must_mention_passed']}/{c['must_mention_rows']} rows with entries", ""),
        ("must_not_mention_rate", ev.must_not_mention_rate, f"{c['must_not_mention_passed']}/{c['rows']} rows", ""),
        ("reply_similarity", ev.reply_similarity, f"judge: {j.get('name', '?')}", ""),
        ("reply_score", ev.reply_score, "mean of 0.5*judge + 0.5*checks", "0.3"),
        ("efficiency", ev.efficiency, wall, "0.1"),
        ("composite", ev.composite, "weighted sum", ""),
    ]
    width = max(len(name) for name, *_ in table)
    lines = [f"{'metric':<{width}}  {'value':>7}  {'weight':>6}  detail"]
    for name, value, detail, weight in table:
        lines.append(f"{name:<{width}}  {_fmt(value):>7}  {weight:>6}  {detail}")
    if j:
        line = f"judge: {j.get('name')}"
        if not j.get("offline"):
            line += (f" | calls {j.get('calls', 0)}, cache hits {j.get('cache_hits', 0)}"
                     f" | tokens {j.get('prompt_tokens', 0)} in / {j.get('completion_tokens', 0)} out"
                     f" | est. cost ${j.get('estimated_cost_usd', 0.0):.4f} of ${j.get('budget_usd', 0.0):.2f}")
            if j.get("fallback_rows"):
                line += f" | {j['fallback_rows']} rows scored offline (MiniLM cosine)"
        lines += ["", line] + [f"  note: {n}" for n in j.get("notes", [])]
    lines.append("")
    if ev.problems:
        lines.append(f"problems ({len(ev.problems)}):")
        lines += [f"  - {p}" for p in ev.problems[:max_problems]]
        if len(ev.problems) > max_problems:
            lines.append(f"  ... and {len(ev.problems) - max_problems} more (--json lists all)")
    else:
        lines.append("problems: none")
    return "\n".join(lines)
