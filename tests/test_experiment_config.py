from pathlib import Path

import pytest

from common.errors import ConfigError
from ctr.experiment import load_experiment

CONFIGS = Path(__file__).parents[1] / "configs" / "experiments"


def test_every_shipped_experiment_validates() -> None:
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    for ds in ("synthetic", "criteo", "criteo_x4", "avazu", "avazu_x4"):
        for model in ("dnn", "deepfm", "dcnv2", "finalmlp"):
            cfg = load_experiment(CONFIGS / f"{ds}_{model}.yaml")
            assert (cfg.name, cfg.model.name, cfg.model.embedding.dim, cfg.trainer.batch_size) == (f"{ds}_{model}", model, 16, 4096)
            assert cfg.trainer.optimizer == "adam" and cfg.trainer.lr == 1e-3
    assert len(names) >= 15


def test_misspelt_model_key(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"extends: {CONFIGS / 'synthetic_dnn.yaml'}\nmodel:\n  hiden: [8]\n")
    with pytest.raises(ConfigError, match=rf"{exp}: unknown key 'model.hiden'; did you mean 'hidden'"):
        load_experiment(exp)


def test_wrong_type_and_bad_width_on_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"<command line>: key 'trainer.batch_size'"):
        load_experiment(CONFIGS / "synthetic_dnn.yaml", ["trainer.batch_size=big"])
    with pytest.raises(ConfigError, match="embedding width 10 is not a multiple of 4"):
        load_experiment(CONFIGS / "synthetic_dnn.yaml", ["model.embedding.dim=10"])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.yaml'}: config file not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_a_bad_stage_is_reported_once_against_its_own_kind(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"extends: {CONFIGS / 'synthetic_dnn.yaml'}\ncompress:\n  - optfs: {{start_from: frozen}}\n")
    with pytest.raises(ConfigError) as bad_value:
        load_experiment(exp)
    assert str(bad_value.value).startswith(f"{exp}: key 'compress.stages.0.optfs.start_from': Input should be 'init'")
    assert ";" not in str(bad_value.value)  # one problem, one message: not one per stage kind
    for entry in ("optfz: {}", "{optfs: {}, afm: {}}", "[optfs]"):
        exp.write_text(f"extends: {CONFIGS / 'synthetic_dnn.yaml'}\ncompress:\n  - {entry}\n")
        with pytest.raises(ConfigError, match=rf"{exp}: key 'compress.stages.0': each stage is one key naming it: "
                                              "optfs, optembed, afm, quantize"):
            load_experiment(exp)
