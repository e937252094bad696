"""`tickettune repro` on tiny fake jobs: identical -> 0, differing -> 1 with the id, failing -> 2."""

from __future__ import annotations

import json
import sys
from argparse import Namespace

import pytest

from tickettune.tools.repro import differing_ids, flag_value, main, sibling, with_flag

# A job that writes results (and an adapter file) where it is told to. With "random", val_2's reply
# is random; latency_ms is always random, and must be ignored.
JOB = """
import json, os, random, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
preds = [{"id": f"val_{i}", "prediction": f"reply {i}", "predicted_intent": "a.b",
          "latency_ms": random.randint(1, 10**6), "tokens_used": 5} for i in range(4)]
if args.get("--mode") == "random":
    preds[2]["prediction"] = f"reply {random.random()}"
if args.get("--mode") == "fail":
    sys.exit(3)
with open(args["--output"], "w") as f:
    json.dump({"training": {"steps": 1}, "predictions": preds}, f)
if "--weights" in args:
    os.makedirs(args["--weights"], exist_ok=True)
    with open(os.path.join(args["--weights"], "adapter_model.safetensors"), "wb") as f:
        f.write(os.environ.get("ADAPTER", "same").encode())
print("seed", os.environ.get("TICKETTUNE_SEED"), "args", sys.argv[1:])
"""


def repro(tmp_path, *extra, seed=None, as_json=True, keep=False) -> Namespace:
    job = [sys.executable, "-c", JOB, "--output", str(tmp_path / "results.json"), *extra]
    return Namespace(job=["--", *job], seed=seed, json=as_json, keep=keep)


def test_identical_runs_exit_0(tmp_path, capsys):
    assert main(repro(tmp_path, "--weights", str(tmp_path / "w"), seed=7)) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["identical"] and out["differing_ids"] == [] and out["predictions"] == 4
    assert out["adapter"]["identical"] is True and out["adapter"]["first"] is not None
    second = out["runs"][1]["command"]
    assert flag_value(second, "--output") != str(tmp_path / "results.json")  # no overwrite
    assert flag_value(second, "--weights") != str(tmp_path / "w")
    assert "seed 7" in captured.err  # TICKETTUNE_SEED exported to the job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "w"]  # second run cleaned up


def test_differing_prediction_exit_1_lists_id(tmp_path, capsys):
    assert main(repro(tmp_path, "--mode", "random", as_json=False)) == 1
    out = capsys.readouterr().out
    assert "DIFFER for 1 of 4 ids: val_2" in out and "NOT reproducible" in out


def test_differing_adapter_exit_1(tmp_path, capsys, monkeypatch):
    calls = iter(["first", "second"])
    import tickettune.tools.repro as repro_module

    real_run = repro_module.run_once

    def run_with_adapter(command, env, label):
        return real_run(command, {**env, "ADAPTER": next(calls)}, label)

    monkeypatch.setattr(repro_module, "run_once", run_with_adapter)
    assert main(repro(tmp_path, "--weights", str(tmp_path / "w"))) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["predictions_identical"] and out["adapter"]["identical"] is False


def test_failed_run_exit_2(tmp_path, capsys):
    assert main(repro(tmp_path, "--mode", "fail")) == 2
    assert "run 1 failed with exit 3" in json.loads(capsys.readouterr().out)["error"]


def test_missing_output_flag_exit_2(capsys):
    assert main(Namespace(job=["--", sys.executable, "-c", "pass"], seed=None, json=False, keep=False)) == 2
    assert "--output" in capsys.readouterr().err


def test_keep_leaves_second_run(tmp_path, capsys):
    assert main(repro(tmp_path, keep=True)) == 0
    assert len(list(tmp_path.glob("results.repro-*.json"))) == 1


@pytest.mark.parametrize("command, flag, expected", [
    (["run.py", "--output", "a.json"], "--output", "a.json"),
    (["run.py", "--output=a.json"], "--output", "a.json"),
    (["run.py", "--output", "a", "--output", "b"], "--output", "b"),
    (["run.py", "--outputs", "a"], "--output", None),
    (["run.py", "--output"], "--output", None),
])
def test_flag_value(command, flag, expected):
    assert flag_value(command, flag) == expected


def test_with_flag_and_sibling():
    assert with_flag(["x", "--seed", "1", "--seed=2"], "--seed", "9") == ["x", "--seed", "9", "--seed=9"]
    assert sibling("out/results.json", "ab") == "out/results.repro-ab.json"
    assert sibling("out/weights", "ab") == "out/weights.repro-ab"


@pytest.mark.parametrize("second, expected", [
    ([{"id": 1, "p": "a", "latency_ms": 9}, {"id": 2, "p": "b"}], []),  # timing ignored
    ([{"id": 1, "p": "a"}, {"id": 2, "p": "B"}], [2]),
    ([{"id": 1, "p": "a"}], [2]),  # dropped id
    ([{"id": 1, "p": "a"}, {"id": 2, "p": "b"}, {"id": 3, "p": "c"}], [3]),  # extra id
])
def test_differing_ids(second, expected):
    first = {"predictions": [{"id": 1, "p": "a", "latency_ms": 1}, {"id": 2, "p": "b"}]}
    assert differing_ids(first, {"predictions": second}) == expected
