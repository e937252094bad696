"""The `eval --report DIR` page: index.html + confusion.png (+ loss_curve.png) from an `Evaluation`.

Owns the pictures and the page layout only; every number comes from `evaluate`. Everything that
comes from data (tickets, replies, labels, ids) is HTML-escaped. It does not render the page in a
browser; open DIR/index.html (or screenshot it with headless Chromium) to look at it.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path

from tickettune.pipeline.data import DataError, TicketId, load_val
from tickettune.tools.evaluate import Evaluation, RowScore, normalise_intent

NO_PREDICTION = "(no prediction)"


# --- pure tables --------------------------------------------------------------------------------

def predicted_column(row: RowScore) -> str:
    """The confusion-matrix column of a row: the gold label when accepted (synonyms included)."""
    if row.intent_ok:
        return row.gold_intent
    if row.predicted_intent is None:
        return NO_PREDICTION
    return normalise_intent(row.predicted_intent) or NO_PREDICTION


def confusion(rows: list[RowScore]) -> tuple[list[str], list[str], list[list[int]]]:
    """(gold labels, predicted labels, counts[gold][predicted]); predicted starts with the gold order.

    Predictions outside the gold labels get their own columns after them, then `(no prediction)`.
    """
    gold = sorted({r.gold_intent for r in rows})
    seen = {predicted_column(r) for r in rows}
    extra = sorted(seen - set(gold) - {NO_PREDICTION})
    predicted = gold + extra + ([NO_PREDICTION] if NO_PREDICTION in seen else [])
    counts = [[0] * len(predicted) for _ in gold]
    for r in rows:
        counts[gold.index(r.gold_intent)][predicted.index(predicted_column(r))] += 1
    return gold, predicted, counts


def top_confusions(rows: list[RowScore], n: int = 8) -> list[tuple[str, str, int]]:
    """The most frequent (gold, predicted) pairs among wrong intents, most frequent first."""
    pairs = Counter((r.gold_intent, predicted_column(r)) for r in rows if not r.intent_ok)
    return sorted(((g, p, k) for (g, p), k in pairs.items()), key=lambda t: (-t[2], t[0], t[1]))[:n]


def per_intent(rows: list[RowScore]) -> list[dict]:
    """One entry per gold intent: rows, correct, accuracy, probe rows, most common wrong prediction."""
    out = []
    for intent in sorted({r.gold_intent for r in rows}):
        mine = [r for r in rows if r.gold_intent == intent]
        wrong = Counter(predicted_column(r) for r in mine if not r.intent_ok).most_common(1)
        out.append({
            "intent": intent, "rows": len(mine), "correct": sum(r.intent_ok for r in mine),
            "accuracy": sum(r.intent_ok for r in mine) / len(mine),
            "probe_rows": sum(r.probe for r in mine),
            "confused_with": f"{wrong[0][0]} ({wrong[0][1]})" if wrong else "",
        })
    return out


def failed_checks(row: RowScore) -> list[str]:
    if row.missing:
        return ["no prediction for this id"]
    out = [f"missing: {' | '.join(e.split('|'))}" for e in row.must_mention_missed]
    out += [f"forbidden: {a}" for a in row.must_not_found]
    if row.reply is None:
        out.append("prediction is not a string")
    return out


def wrong_rows(rows: list[RowScore]) -> list[RowScore]:
    """Rows with a wrong intent or a failed check: wrong intents first, then by gold intent and id."""
    bad = [r for r in rows if not r.intent_ok or r.must_mention_ok is False or not r.must_not_ok]
    return sorted(bad, key=lambda r: (r.intent_ok, r.gold_intent, str(r.id)))


# --- inputs found next to the files -------------------------------------------------------------

def read_loss_history(weights_dir: str | Path | None) -> list[dict] | None:
    """`loss_history.json` entries with a numeric step and loss (val_loss optional); None if absent."""
    if weights_dir is None:
        return None
    try:
        raw = json.loads((Path(weights_dir) / "loss_history.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, list):
        return None

    def number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    entries = [e for e in raw if isinstance(e, dict) and number(e.get("step"))
               and (number(e.get("loss")) or number(e.get("val_loss")))]
    return entries or None


def find_tickets(labels_path: str | Path | None) -> dict[TicketId, str] | None:
    """Ticket text by id from `val.jsonl` in the labels file's folder; None when absent or unusable."""
    if labels_path is None:
        return None
    path = Path(labels_path).parent / "val.jsonl"
    if not path.is_file():
        return None
    try:
        return {t.id: t.ticket for t in load_val(path)}
    except DataError:
        return None


# --- pictures -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: str | Path, gold: list[str], predicted: list[str], counts: list[list[int]]) -> None:
    """Gold on rows, predicted on columns; correct cells green, confusions red, counts written in."""
    plt = _pyplot()
    from matplotlib import colormaps

    greens, reds = colormaps["Greens"], colormaps["Reds"]
    max_off = max([c for i, row in enumerate(counts) for j, c in enumerate(row)
                   if c and predicted[j] != gold[i]] or [1])
    rgba = []  # (G, P, 4)
    for i, row in enumerate(counts):
        total = sum(row) or 1
        cells = []
        for j, c in enumerate(row):
            if c == 0:
                cells.append((1.0, 1.0, 1.0, 1.0))
            elif predicted[j] == gold[i]:
                cells.append(greens(0.25 + 0.6 * c / total))
            else:
                cells.append(reds(0.35 + 0.6 * c / max_off))
        rgba.append(cells)

    width = max(7.0, 0.6 * len(predicted) + 4.5)
    height = max(5.0, 0.5 * len(gold) + 3.5)
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            if c:
                dark = (predicted[j] == gold[i] and c / (sum(row) or 1) > 0.5) or predicted[j] != gold[i]
                ax.text(j, i, str(c), ha="center", va="center", fontsize=11, fontweight="bold",
                        color="white" if dark else "black")
    ax.set_xticks(range(len(predicted)), labels=predicted, rotation=40, ha="right", rotation_mode="anchor",
                  fontsize=9)
    ax.set_yticks(range(len(gold)), labels=[f"{g}  ({sum(r)})" for g, r in zip(gold, counts)], fontsize=9)
    ax.set_xticks([x - 0.5 for x in range(1, len(predicted))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(gold))], minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted intent", fontsize=10, fontweight="bold")
    ax.set_ylabel("gold intent  (rows)", fontsize=10, fontweight="bold")
    ax.set_title("Confusion matrix: green = correct, red = confused", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_loss(path: str | Path, history: list[dict]) -> None:
    """One train line (and val points) per adapter/task: each adapter's steps start at 1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    tasks = list(dict.fromkeys(str(e.get("task", "")) for e in history))
    colors = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
    for k, task in enumerate(tasks):
        rows = [e for e in history if str(e.get("task", "")) == task]
        name = f"{task} " if task else ""
        train = [(e["step"], e["loss"]) for e in rows if isinstance(e.get("loss"), (int, float))]
        val = [(e["step"], e["val_loss"]) for e in rows if isinstance(e.get("val_loss"), (int, float))]
        if train:
            ax.plot(*zip(*train), label=f"{name}train loss", color=colors[k % len(colors)], linewidth=1.6)
        if val:
            ax.plot(*zip(*val), "o", label=f"{name}val loss (held-out rows)", color=colors[k % len(colors)],
                    markersize=7, markeredgecolor="#d62728", markeredgewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- page ---------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px 32px; color: #222;
       max-width: 1400px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; }
.sub { color: #666; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.metrics td:first-child { font-family: ui-monospace, monospace; }
.bar { display: inline-block; height: 10px; background: #4caf50; vertical-align: middle; }
.barbg { display: inline-block; width: 100px; height: 10px; background: #f3d0d0; margin-right: 6px; }
.conf li { margin: 2px 0; } .conf b { color: #c62828; }
.wrong td { max-width: 380px; white-space: pre-wrap; word-wrap: break-word; }
.bad { color: #c62828; font-weight: 600; } .ok { color: #2e7d32; }
.flag { color: #8a6d00; font-size: 12px; }
.problems li { font-family: ui-monospace, monospace; font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def forgetting_section(summary: dict) -> str:
    """The `tickettune forgetting` table: base model against each adapter on general questions."""
    base = summary["base"]
    rows = [f"<tr><td>base</td><td class='num'>{_f(base['acc'])}</td><td class='num'>{_f(base['acc_norm'])}</td>"
            "<td>—</td></tr>"]
    for name, a in summary.get("adapters", {}).items():
        low, high = a["ci95"]
        flag = " <span class='flag'>forgets</span>" if a["delta_acc"] < -0.02 and high < 0 else ""
        rows.append(f"<tr><td>+ {_e(name)} adapter</td><td class='num'>{_f(a['acc'])}</td>"
                    f"<td class='num'>{_f(a['acc_norm'])}</td><td class='num'>{a['delta_acc']:+.3f} "
                    f"({low:+.3f} to {high:+.3f}){flag}</td></tr>")
    return (f"<h2>General ability (forgetting check)</h2><p class='sub'>{summary.get('questions', '?')} "
            "multiple-choice questions, zero-shot, option log-likelihood; the change from the base model with "
            "a paired 95% confidence interval. An adapter is flagged when it loses more than 0.02 with an "
            "interval below 0.</p><table><tr><th>model</th><th>acc</th><th>acc_norm</th>"
            "<th>Δ acc vs base (95% CI)</th></tr>" + "".join(rows) + "</table>")


def render_html(ev: Evaluation, *, tickets: dict[TicketId, str] | None, has_loss: bool,
                title: str = "tickettune eval report", forgetting: dict | None = None) -> str:
    """The report page: the summary metrics, which intents are confused, per-intent accuracy, the
    loss curve (`has_loss`), the forgetting check, the wrong rows (with their `tickets` when known),
    the problems and the judge's notes."""
    parts = _header(ev, title) + _metrics(ev) + _confusions(ev) + _per_intent(ev)
    if has_loss:
        parts.append("<h2>Training loss</h2><img src='loss_curve.png' alt='training loss curve'>")
    if forgetting:
        parts.append(forgetting_section(forgetting))
    parts += _wrong_rows(ev, tickets)
    if ev.problems:
        parts.append(f"<h2>Problems ({len(ev.problems)})</h2><ul class='problems'>"
                     + "".join(f"<li>{_e(p)}</li>" for p in ev.problems) + "</ul>")
    if ev.judge.get("notes"):
        parts.append("<h2>Judge notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in ev.judge["notes"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _header(ev: Evaluation, title: str) -> list[str]:
    """The page's head, title and counts line (with the judge's)."""
    c, j = ev.summary()["counts"], ev.judge
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    judge_line = f"reply judge: <b>{_e(j.get('name', '?'))}</b>"
    if j and not j.get("offline"):
        judge_line += (f", {j.get('calls', 0)} calls, {j.get('cache_hits', 0)} cached, "
                       f"est. cost ${j.get('estimated_cost_usd', 0):.4f}")
        if j.get("fallback_rows"):
            judge_line += f", <span class='flag'>{j['fallback_rows']} rows scored offline (MiniLM cosine)</span>"
    parts.append(f"<p class='sub'>{c['rows']} labelled rows ({c['ordinary']} ordinary, {c['probe']} probe), "
                 f"{c['missing_predictions']} without a prediction; {judge_line}</p>")
    return parts


def _metrics(ev: Evaluation) -> list[str]:
    """The summary metrics table."""
    c = ev.summary()["counts"]
    rows = [("composite", ev.composite, "0.4·intent + 0.3·reply + 0.2·probe + 0.1·efficiency"),
            ("intent_accuracy", ev.intent_accuracy, f"{c['ordinary_correct']}/{c['ordinary']} ordinary rows"),
            ("probe_accuracy", ev.probe_accuracy, f"{c['probe_correct']}/{c['probe']} probe rows"),
            ("reply_score", ev.reply_score, "mean of ½·judge + ½·checks"),
            ("reply_similarity", ev.reply_similarity, "mean judge score"),
            ("must_mention_rate", ev.must_mention_rate,
             f"{c['must_mention_passed']}/{c['must_mention_rows']} rows with entries"),
            ("must_not_mention_rate", ev.must_not_mention_rate, f"{c['must_not_mention_passed']}/{c['rows']} rows"),
            ("efficiency", ev.efficiency,
             "wall_clock_s missing" if ev.wall_clock_s is None else f"wall_clock_s {ev.wall_clock_s:.1f}")]
    parts = ["<table class='metrics'><tr><th>metric</th><th>value</th><th>detail</th></tr>"]
    parts += [f"<tr><td>{_e(n)}</td><td class='num'>{_f(v)}</td><td>{_e(d)}</td></tr>" for n, v, d in rows]
    parts.append("</table>")
    return parts


def _confusions(ev: Evaluation) -> list[str]:
    """Which intents are confused: the list first (readable at a glance), then the matrix."""
    parts = ["<h2>Which intents are confused</h2>"]
    top = top_confusions(ev.rows)
    if top:
        parts.append("<ul class='conf'>" + "".join(
            f"<li><b>{k}×</b> gold <code>{_e(g)}</code> → predicted <code>{_e(p)}</code></li>" for g, p, k in top)
            + "</ul>")
    else:
        parts.append("<p class='ok'>No intent confusions.</p>")
    parts.append("<img src='confusion.png' alt='confusion matrix: gold intent on rows, predicted on columns'>")
    return parts


def _per_intent(ev: Evaluation) -> list[str]:
    """Per-intent accuracy, the worst first."""
    parts = ["<h2>Per-intent accuracy</h2><table><tr><th>gold intent</th><th>rows</th><th>probe</th>"
             "<th>correct</th><th>accuracy</th><th>most often predicted instead</th></tr>"]
    for p in sorted(per_intent(ev.rows), key=lambda p: (p["accuracy"], p["intent"])):
        bar = (f"<span class='barbg'><span class='bar' style='width:{round(100 * p['accuracy'])}px'></span>"
               f"</span>{p['accuracy']:.2f}")
        parts.append(f"<tr><td><code>{_e(p['intent'])}</code></td><td class='num'>{p['rows']}</td>"
                     f"<td class='num'>{p['probe_rows']}</td><td class='num'>{p['correct']}</td><td>{bar}</td>"
                     f"<td>{_e(p['confused_with'])}</td></tr>")
    parts.append("</table>")
    return parts


def _wrong_rows(ev: Evaluation, tickets: dict[TicketId, str] | None) -> list[str]:
    """The wrong rows side by side (a wrong intent or a failed check), with their tickets when known."""
    bad = wrong_rows(ev.rows)
    parts = [f"<h2>Wrong rows ({len(bad)})</h2>"
             "<p class='sub'>Rows with a wrong intent or a failed must/must-not check.</p>"]
    if bad:
        head = "<tr><th>id</th>" + ("<th>ticket</th>" if tickets is not None else "")
        parts.append("<table class='wrong'>" + head + "<th>intent: predicted / gold</th><th>reply</th>"
                     "<th>ideal reply</th><th>failed checks</th><th>judge</th></tr>")
        for r in bad:
            probe = " <span class='flag'>probe</span>" if r.probe else ""
            pred = NO_PREDICTION if r.predicted_intent is None else r.predicted_intent
            intent = (f"<span class='{'ok' if r.intent_ok else 'bad'}'>{_e(pred)}</span><br>"
                      f"gold: {_e(r.gold_intent)}")
            checks = "<br>".join(f"<span class='bad'>{_e(x)}</span>" for x in failed_checks(r)) or "—"
            judged = f"{r.judge:.2f}" + (" <span class='flag'>offline</span>" if r.judge_fallback else "")
            ticket = f"<td>{_e(tickets.get(r.id, ''))}</td>" if tickets is not None else ""
            parts.append(f"<tr><td>{_e(r.id)}{probe}</td>{ticket}<td>{intent}</td>"
                         f"<td>{_e(r.reply if r.reply is not None else '')}</td><td>{_e(r.ideal_reply)}</td>"
                         f"<td>{checks}</td><td class='num'>{judged}</td></tr>")
        parts.append("</table>")
    return parts


def write_report(out_dir: str | Path, ev: Evaluation, *, labels_path: str | Path | None = None,
                 results_path: str | Path | None = None, weights_dir: str | Path | None = None,
                 forgetting: dict | None = None) -> Path:
    """Write index.html, confusion.png and (with a loss history) loss_curve.png; returns index.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gold, predicted, counts = confusion(ev.rows)
    if gold:
        plot_confusion(out / "confusion.png", gold, predicted, counts)
    history = read_loss_history(weights_dir)
    if history:
        plot_loss(out / "loss_curve.png", history)
    title = f"tickettune eval: {Path(results_path).name}" if results_path else "tickettune eval report"
    page = out / "index.html"
    page.write_text(render_html(ev, tickets=find_tickets(labels_path), has_loss=bool(history), title=title,
                                forgetting=forgetting), encoding="utf-8")
    return page
