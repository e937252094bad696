import json

import pytest

from tickettune.pipeline.config import ConfigError, RunConfig, TrainConfig, load_overrides


def test_plan_defaults_differ_for_gpu():
    cpu, gpu = RunConfig.for_plan("cpu"), RunConfig.for_plan("cuda")
    assert cpu.train.lr > gpu.train.lr
    assert gpu.infer.list_labels and not cpu.infer.list_labels


def test_overrides_apply_and_every_problem_is_reported():
    cfg = RunConfig.for_plan("cpu", {"seed": 3, "train": {"epochs": 1}, "infer": {"lm_weight": 2}})
    assert (cfg.seed, cfg.train.epochs, cfg.infer.lm_weight) == (3, 1, 2.0)
    with pytest.raises(ConfigError) as err:
        RunConfig.for_plan("cpu", {"train": {"epochs": "2", "nope": 1}, "infer": 3, "other": 1})
    assert err.value.problems == ["train.epochs: expected int, got '2'", "train.nope: unknown setting",
                                  "infer: expected an object", "other: unknown setting"]


def test_invalid_values_are_gathered():
    with pytest.raises(ConfigError) as err:
        RunConfig(train=TrainConfig(epochs=0, lr=0.0, holdout_frac=1.0))
    assert len(err.value.problems) == 3


def test_config_round_trips_through_json(tmp_path):
    cfg = RunConfig.for_plan("cuda", {"train": {"epochs": 2}})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": cfg.to_dict()["train"], "infer": cfg.to_dict()["infer"]}))
    assert RunConfig.for_plan("cpu", load_overrides(path)) == RunConfig(seed=cfg.seed, budget_s=cfg.budget_s, train=cfg.train, infer=cfg.infer)


def test_bad_config_file_is_reported(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[1]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_overrides(path)
