from pathlib import Path

import pytest

from common.errors import ConfigError
from common.yaml_config import load_config
from features.schema import DatasetFile

BASE = """
dataset:
  name: base
  layout: criteo_tsv
  output: out/base
  min_count: 10
  split: {method: random, seed: 1}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_extends_merges_deeply_and_child_wins(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ndataset:\n  name: child\n  split: {seed: 5}\n")
    cfg = load_config(DatasetFile, child).dataset
    assert (cfg.name, cfg.min_count, cfg.split.method, cfg.split.seed) == ("child", 10, "random", 5)


def test_overrides_are_typed(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", BASE)
    cfg = load_config(DatasetFile, base, ["dataset.min_count=3", "dataset.split.ratios=[0.5, 0.25, 0.25]"]).dataset
    assert cfg.min_count == 3 and cfg.split.ratios == (0.5, 0.25, 0.25)


def test_unknown_key_names_key_file_and_closest_valid_key(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ndataset:\n  min_cont: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(DatasetFile, child)
    msg = str(err.value)
    assert "dataset.min_cont" in msg and str(child) in msg and "did you mean 'min_count'" in msg


def test_unknown_nested_key_from_the_command_line(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", BASE)
    with pytest.raises(ConfigError, match=r"<command line>: unknown key 'dataset.split.sed'; did you mean 'seed'"):
        load_config(DatasetFile, base, ["dataset.split.sed=3"])


def test_bad_value_names_the_key_and_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", BASE.replace("min_count: 10", "min_count: many"))
    with pytest.raises(ConfigError, match=r"base.yaml: key 'dataset.min_count'"):
        load_config(DatasetFile, base)


def test_extends_cycle_and_missing_file(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(DatasetFile, a)
    with pytest.raises(ConfigError, match="not found"):
        load_config(DatasetFile, tmp_path / "nope.yaml")


def test_generic_layout_requires_columns(tmp_path: Path) -> None:
    f = write(tmp_path / "g.yaml", "dataset: {name: g, layout: generic, output: o, separator: ','}\n")
    with pytest.raises(ConfigError, match="needs columns, header"):
        load_config(DatasetFile, f)


def test_shipped_dataset_configs_validate() -> None:
    configs = sorted((Path(__file__).parents[1] / "configs" / "datasets").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        load_config(DatasetFile, path)
