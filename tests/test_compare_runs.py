"""bench/compare_runs.py pairs two many-desk results desk by desk (fast: made-up results, no model)."""

import json
import subprocess
import sys

from conftest import ROOT


def desk(name, half, intent, reply=None):
    methods = {"run": {"intent": intent, "probes": float("nan") if reply is None else intent}}
    if reply is not None:
        methods["compose"] = {"reply": reply}
    return {"desk": name, "half": half, "replies": reply is not None, "methods": methods}


def test_it_pairs_the_desks_both_sides_hold_and_reports_the_difference_per_half(tmp_path):
    left, right = tmp_path / "left.json", tmp_path / "right.json"
    left.write_text(json.dumps({"encoder": "mpnet", "results": [
        desk("a", "choose", 0.9, 0.7), desk("b", "report", 0.8, 0.6), desk("c", "report", 1.0, 0.8),
        desk("only-left", "report", 0.0, 0.0), desk("bank", "report", 0.5)]}))
    right.write_text(json.dumps({"results": [  # a file from before the encoder was recorded: minilm
        desk("a", "choose", 0.8, 0.7), desk("b", "report", 0.7, 0.5), desk("c", "report", 0.8, 0.7),
        desk("bank", "report", 0.6)]}))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_runs.py"), str(left), "--against", str(right)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    sections = {block.split("\n")[0]: block for block in proc.stdout.split("\n### ")[1:]}
    report = sections["report desks, desks with replies: mpnet vs minilm"]
    assert "| intent (run) | 2 | 0.900 | 0.750 | +0.150 (" in report        # b and c; not only-left
    assert "| reply (compose) | 2 | 0.700 | 0.600 | +0.100 (" in report
    everything = sections["all desks, desks with replies: mpnet vs minilm"]
    assert "| intent (run) | 3 | 0.900 | 0.767 | +0.133 (" in everything
    assert "probes" not in sections["all desks, intent-only desks: mpnet vs minilm"]  # NaN: no probes there
    assert "| intent (run) | 1 | 0.500 | 0.600 | -0.100 (+nan, +nan) |" in sections[
        "all desks, intent-only desks: mpnet vs minilm"]
