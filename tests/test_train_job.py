from pathlib import Path

from ctr.experiment import ExperimentConfig
from ctr.models import model_config
from features.schema import DatasetConfig
from pipelines.train_job import prepared_data

from conftest import DATA


def test_data_is_prepared_again_when_the_dataset_config_changes(tmp_path: Path) -> None:
    def cfg(min_count: int) -> ExperimentConfig:
        ds = DatasetConfig(name="t", layout="criteo_tsv", raw=[str(DATA / "criteo_kaggle_train.head200.tsv")],
                           output=str(tmp_path / "prepared"), min_count=min_count)
        return ExperimentConfig(name="e", dataset=ds, model=model_config(name="dnn"))

    _, first = prepared_data(cfg(1))
    stamp = (tmp_path / "prepared" / "train.parquet").stat().st_mtime_ns
    _, same = prepared_data(cfg(1))
    assert same == first and (tmp_path / "prepared" / "train.parquet").stat().st_mtime_ns == stamp
    _, changed = prepared_data(cfg(5))
    assert changed.fields[20].min_count == 5 and changed.config_fingerprint != first.config_fingerprint
