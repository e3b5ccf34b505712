import json
from pathlib import Path

import pytest

from pipelines.cli import main

from conftest import DATA


def test_prepare_command_with_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ds.yaml"
    config.write_text(f"dataset: {{name: cli, layout: avazu_csv, output: {tmp_path / 'out'}}}\n")
    code = main(["prepare", str(config), "dataset.min_count=1", "--raw", str(DATA / "avazu_deepctr_sample.csv")])
    assert code == 0
    assert "prepared cli: 100 rows read, 0 rejected" in capsys.readouterr().out
    assert (tmp_path / "out" / "feature_map.json").is_file()


def test_errors_exit_2_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ds.yaml"
    config.write_text(f"dataset: {{name: cli, layout: criteo_tsv, output: {tmp_path / 'out'}}}\n")
    assert main(["prepare", str(config), "dataset.min_cnt=1"]) == 2
    assert "did you mean 'min_count'" in capsys.readouterr().err
    assert main(["prepare", str(config), "--raw", str(tmp_path / "missing.txt")]) == 2
    assert f"{tmp_path / 'missing.txt'}: raw file not found" in capsys.readouterr().err


def test_synthetic_dataset_generates_its_raw_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ds.yaml"
    raw = tmp_path / "raw" / "gen.txt"
    config.write_text(
        f"dataset: {{name: syn, layout: criteo_tsv, raw: [{raw}], output: {tmp_path / 'out'},"
        f" synthetic: {{kind: criteo, rows: 3000, seed: 1}}}}\n")
    assert main(["prepare", str(config)]) == 0
    assert raw.is_file() and Path(f"{raw}.teacher.json").is_file()
    assert "3000 rows read" in capsys.readouterr().out


def test_compress_needs_a_trained_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp.yaml"
    configs = Path(__file__).parents[1] / "configs" / "experiments"
    exp.write_text(f"extends: {configs / 'synthetic_dnn_optfs.yaml'}\ntrainer: {{run_dir: {tmp_path / 'run'}}}\n")
    assert main(["compress", str(exp)]) == 2
    assert "no trained checkpoint; run 'ctr train" in capsys.readouterr().err


def test_train_refuses_to_mix_two_runs_in_one_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    configs = Path(__file__).parents[1] / "configs" / "experiments"
    assert main(["train", str(configs / "synthetic_dnn.yaml"), f"trainer.run_dir={run}"]) == 2
    assert f"{run} already holds a run: continue it with --resume" in capsys.readouterr().err


def test_prepare_accepts_an_experiment_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""
name: e
dataset: {{name: cli, layout: avazu_csv, output: {tmp_path / 'out'}, min_count: 1}}
model: {{name: dnn}}
""")
    assert main(["prepare", str(exp), "--raw", str(DATA / "avazu_deepctr_sample.csv")]) == 0
    assert "prepared cli: 100 rows read" in capsys.readouterr().out
    exp.write_text(exp.read_text() + "trainer: {epoks: 2}\n")
    assert main(["prepare", str(exp)]) == 2  # the whole experiment is validated, not just its dataset
    assert "did you mean 'epochs'" in capsys.readouterr().err


@pytest.mark.slow
def test_run_does_the_whole_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw" / "gen.txt"
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""
name: chain
dataset: {{name: syn, layout: criteo_tsv, raw: [{raw}], output: {tmp_path / 'prep'}, min_count: 2,
          synthetic: {{kind: criteo, rows: 6000, seed: 3}}}}
model: {{name: dnn, hidden: [16], embedding: {{dim: 8}}}}
trainer: {{batch_size: 512, eval_batch_size: 4096, progress: false, threads: 1, run_dir: {tmp_path / 'run'}}}
compress:
  - afm: {{embedding_rank: {{fixed: 4}}, finetune_epochs: 0}}
""")
    assert main(["run", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "| baseline |" in out and "| compressed |" in out and "teacher reaches AUC" in out
    assert (tmp_path / "run" / "evaluation" / "report.html").is_file()
    assert (tmp_path / "run" / "export" / "compressed.pt").is_file()
    assert main(["run", str(exp)]) == 0  # a second run reuses the trained baseline and the stage
    capsys.readouterr()
    # an unrelated <raw>.teacher.json is only a missing extra, never a crash of the finished chain
    Path(f"{raw}.teacher.json").write_text(json.dumps({"note": "not the generator's"}))
    assert main(["run", str(exp)]) == 0
    assert "| compressed |" in capsys.readouterr().out
    # the recipe runs on the trained run's config: a YAML whose model differs is refused, naming the key
    assert main(["compress", str(exp), "model.hidden=[8]"]) == 2
    err = capsys.readouterr().err
    assert "model.hidden differ(s) from the trained run" in err and err.count("\n") == 1
