"""Run configuration: TOML + dotted overrides, typed values, every problem reported at once with hints."""

from __future__ import annotations

import tomllib

import pytest

from tetra.config import build_run_config, load_run_config
from tetra.errors import ConfigError


def test_toml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[init]\npreset = "tiny"\n[data]\npath = "d"\n[train]\nlr = 1e-3\nmax_steps = 50\n'
                    'warmup_steps = 5\n')
    config, explicit = load_run_config(path, ["train.lr=2e-3", "model.n_layers=2", "run.dir=out", "train.compile=true",
                                              "model.rope_scaling.factor=2"])
    assert config.train.lr == 2e-3 and config.train.max_steps == 50 and config.train.compile is True
    assert config.model.n_layers == 2 and config.run.dir == "out" and config.model.rope_scaling.factor == 2.0
    assert explicit == {"n_layers": 2, "rope_scaling": {"factor": 2}}
    assert config.init.preset == "tiny"


def test_every_problem_is_reported_at_once_with_hints():
    with pytest.raises(ConfigError) as error:
        build_run_config({"train": {"lrr": 1, "max_steps": 0, "schedule": "cos", "batch_size": "8"},
                          "model": {"hiden_size": 3}, "parallel": {"gemm_layout": "sideways"}})
    message = str(error.value)
    for expected in ("unknown key train.lrr (did you mean train.lr?)",
                     "unknown key model.hiden_size (did you mean model.hidden_size?)",
                     "train.max_steps must be at least 1", "train.schedule = 'cos'; choose one of",
                     "train.batch_size = '8' has the wrong type", "data.path is empty",
                     "parallel.gemm_layout = 'sideways'; choose one of auto, out_in, in_out"):
        assert expected in message


def test_resolved_config_round_trips_through_toml():
    config = build_run_config({"data": {"path": "x"}, "train": {"warmup_steps": 3}, "model": {"eos_token_id": [1, 2]}})
    again = build_run_config(tomllib.loads(config.to_toml()))
    assert again == config


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        load_run_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(tmp_path / "bad.toml")
