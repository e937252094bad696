import json
import math

import pytest

from tickettune.pipeline.results import Prediction, TrainingStats, finite, write_json_atomic, write_results


def test_non_finite_numbers_become_zero_and_schema_is_exact(tmp_path):
    out = tmp_path / "deep" / "results.json"
    write_results(out, TrainingStats(3, math.nan, math.inf, 12.3456789), [Prediction("a", "hi", "x", 5, 9)])
    data = json.loads(out.read_text())
    assert data == {"training": {"steps": 3, "train_loss": 0.0, "val_loss": 0.0, "wall_clock_s": 12.3457},
                    "predictions": [{"id": "a", "prediction": "hi", "predicted_intent": "x", "latency_ms": 5, "tokens_used": 9}]}
    assert finite(-math.inf, 1.5) == 1.5


def test_duplicate_ids_are_refused_before_writing(tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(AssertionError):
        write_results(out, TrainingStats(1, 0, 0, 0), [Prediction("a", "", "x", 0, 0)] * 2)
    assert not out.exists()


def test_atomic_write_leaves_old_file_intact_on_failure(tmp_path):
    out = tmp_path / "r.json"
    write_json_atomic(out, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(out, {"bad": object()})
    assert json.loads(out.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
