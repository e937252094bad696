"""The HTML report: wrong rows present and escaped, PNGs valid, loss history optional."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tickettune.pipeline.data import Label
from tickettune.tools.evaluate import score
from tickettune.tools.results_file import parse_results
from tickettune.tools.report import (
    NO_PREDICTION,
    confusion,
    per_intent,
    read_loss_history,
    top_confusions,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])  # IHDR width, height


LABELS = [
    Label("v1", "billing.refund", "Refunds take 14 days.", ("14 days",), ("24 hours",)),
    Label("v2", "billing.refund", "Refunds take 14 days.", ("14 days",), ("24 hours",)),
    Label("v3", "billing.invoice", "Invoices are under Billing.", ("Billing",)),
    Label("v4", "account.reset", "Use the reset link.", (), (), True),
    Label("v5", "account.reset", "Use the reset link.", ("reset link",)),
]
PREDICTIONS = [
    {"id": "v1", "prediction": "Refunds take 14 days.", "predicted_intent": "billing.refund"},
    {"id": "v2", "prediction": "<script>alert('x')</script> within 24 hours", "predicted_intent": "billing.invoice"},
    {"id": "v3", "prediction": "See Billing.", "predicted_intent": "Billing.Invoice"},
    {"id": "v4", "prediction": "Use the reset link.", "predicted_intent": "billing.refund"},
]


def evaluation():
    preds = [{**p, "latency_ms": 1, "tokens_used": 1} for p in PREDICTIONS]
    parsed = parse_results({"training": {"steps": 3, "train_loss": 1.0, "val_loss": 1.1, "wall_clock_s": 700},
                            "predictions": preds}, [l.id for l in LABELS])
    return score(LABELS, parsed, judge_scores=[1.0, 0.1, 0.9, 1.0, 0.0],
                 judge_info={"name": "offline (MiniLM cosine)", "offline": True})


def test_confusion_gold_rows_predicted_columns():
    gold, predicted, counts = confusion(evaluation().rows)
    assert gold == ["account.reset", "billing.invoice", "billing.refund"]
    assert predicted == gold + [NO_PREDICTION]
    assert counts == [[0, 0, 1, 1],  # account.reset: v4 -> billing.refund, v5 missing
                      [0, 1, 0, 0],  # billing.invoice: v3 right after normalisation
                      [0, 1, 1, 0]]  # billing.refund: v1 right, v2 -> billing.invoice
    assert top_confusions(evaluation().rows)[0][2] == 1
    assert [p["accuracy"] for p in per_intent(evaluation().rows)] == [0.0, 1.0, 0.5]


def test_report_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.jsonl").write_text("\n".join(json.dumps({"id": l.id, "ticket": f"ticket <{l.id}>"})
                                                          for l in LABELS) + "\n")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "loss_history.json").write_text(json.dumps(
        [{"step": s, "epoch": s / 10, "loss": 2.0 / s} for s in range(1, 11)] + [{"step": 10, "val_loss": 0.9}]))
    page = write_report(tmp_path / "report", evaluation(), labels_path=tmp_path / "data" / "val_labels.jsonl",
                        results_path=tmp_path / "results.json", weights_dir=weights)
    text = page.read_text()
    # the wrong rows: v2 (wrong intent + must_not), v4 (wrong probe intent), v5 (missing); not v1 or v3
    for row_id in ("v2", "v4", "v5"):
        assert f"<td>{row_id}" in text
    assert "<td>v1" not in text and "<td>v3" not in text
    assert "ticket &lt;v2&gt;" in text  # tickets from val.jsonl next to the labels, escaped
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "forbidden: 24 hours" in text and "missing: 14 days" in text and "no prediction for this id" in text
    assert "offline (MiniLM cosine)" in text and "loss_curve.png" in text
    for name, min_size in (("confusion.png", (500, 400)), ("loss_curve.png", (400, 250))):
        width, height = png_size(tmp_path / "report" / name)
        assert width >= min_size[0] and height >= min_size[1]
        assert (tmp_path / "report" / name).stat().st_size > 5_000


def test_report_without_tickets_or_loss(tmp_path):
    page = write_report(tmp_path / "r", evaluation(), labels_path=tmp_path / "labels.jsonl", weights_dir=None)
    text = page.read_text()
    assert "<th>ticket</th>" not in text and "loss_curve.png" not in text
    assert not (tmp_path / "r" / "loss_curve.png").exists()
    assert png_size(tmp_path / "r" / "confusion.png")[0] > 0


@pytest.mark.parametrize("content, expected", [
    (None, None),  # no file
    ("not json", None),
    ('{"step": 1}', None),  # not a list
    ('[{"step": 1, "loss": 2.0}, {"step": "x", "loss": 1}, {"step": 2, "val_loss": 1.5}, 7]',
     [{"step": 1, "loss": 2.0}, {"step": 2, "val_loss": 1.5}]),
    ('[{"step": 1, "loss": NaN}]', None),
])
def test_read_loss_history_tolerates_bad_files(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "loss_history.json").write_text(content)
    assert read_loss_history(tmp_path) == expected
