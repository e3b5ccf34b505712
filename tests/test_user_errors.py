"""Every expected user error ends as one line, ``error: <file>[:<line>]: <what> (<what to do>)``, exit
status 2, with nothing half-written or stale left behind (one test per item of the bad-input issue)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctr.run_dir import RunDir
from deploy.export import export_model, manifest_path, pending_manifest_path
from features.prepare import PrepareResult
from pipelines.cli import main
from pipelines.synthetic import generate, read_teacher

ROOT = Path(__file__).parents[1]
ONE_LINE = re.compile(r"^error: \S.*: .+ \(.+\)$")


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    """Run the CLI, expect exit status 2 and one ``error:`` line that holds every expected piece."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert ONE_LINE.match(lines[0]), lines[0]
    for piece in expected:
        assert piece in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def big_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough rows that ctr prepare runs for a few seconds: time to act while it holds its output."""
    raw = tmp_path_factory.mktemp("big") / "big.txt"
    generate("criteo", 400_000, raw, seed=5)
    return raw


def litter(folder: Path) -> list[str]:
    """Scratch that a run could leave: temporary and retired names (the lock file is not litter)."""
    return sorted(p.name for p in folder.iterdir() if re.search(r"\.(tmp|old)-|\.tmp$|\.pending\.", p.name))


def test_1_a_foreign_teacher_file_is_ignored(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    generate("criteo", 50, raw, seed=1)
    assert read_teacher(raw)["rows"] == 50
    (tmp_path / "raw.txt.teacher.json").write_text(json.dumps({"note": "someone else's file"}))
    assert read_teacher(raw) is None  # no format field: not the generator's, so not read
    (tmp_path / "raw.txt.teacher.json").write_text("{not json")
    assert read_teacher(raw) is None


def generic_config(tmp_path: Path, text: str, **extra: str) -> Path:
    raw = tmp_path / "raw.csv"
    raw.write_text(text)
    config = tmp_path / "ds.yaml"
    options = "".join(f", {k}: {v}" for k, v in extra.items())
    config.write_text(f"dataset: {{name: g, layout: generic, separator: ',', header: true, raw: [{raw}], "
                      f"output: {tmp_path / 'out'}, min_count: 1, max_reject_fraction: 0.9, "
                      f"split: {{method: order}}, columns: [{{name: y, kind: label}}, {{name: x, kind: numeric}}, "
                      f"{{name: c, kind: categorical}}]{options}}}\n")
    return config


def test_2_non_finite_numbers_are_rejected_not_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = ["y,x,c"] + [f"{i % 2},{v},a{i % 3}" for i, v in enumerate(["1.5", "inf", "-Infinity", "1e400", "nan", "-2"] * 5)]
    config = generic_config(tmp_path, "\n".join(rows) + "\n")
    assert main(["prepare", str(config)]) == 0
    capsys.readouterr()
    reasons = pl.read_csv(tmp_path / "out" / "rejects.csv")["reason"].to_list()
    assert len(reasons) == 20 and all("expected a finite number" in r for r in reasons)
    written = pl.concat([pl.read_parquet(tmp_path / "out" / f"{s}.parquet") for s in ("train", "valid", "test")])
    assert written.height == 10 and np.isfinite(written["x"].to_numpy()).all()


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "m.pt"
    export_model(runs["dcnv2"], out, "latest")
    return out


def write_split(path: Path, prepared: PrepareResult, **changes: pa.Array) -> Path:
    table = pq.read_table(prepared.output / prepared.feature_map.splits["test"].file).slice(0, 500)
    for name, column in changes.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    pq.write_table(table, path)
    return path


def test_3_evaluate_and_score_name_bad_data(runs: dict[str, Path], exported: Path, prepared_criteo: PrepareResult,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    field = prepared_criteo.feature_map.categorical[0].name
    ones = write_split(tmp_path / "ones.parquet", prepared_criteo, label=pa.array(np.ones(500, np.float32)))
    assert main(["evaluate", str(exported), "--data", str(ones), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr()
    assert "undefined (one class)" in printed.out and "every label is 1" in printed.err
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())["models"][0]
    assert saved["auc"] is None and saved["logloss"] > 0
    nulls = pa.array([None] + list(range(1, 500)), pa.int32())
    cases = {
        "null ids": (write_split(tmp_path / "null.parquet", prepared_criteo, **{field: nulls}), "row 0: column"),
        "string ids": (write_split(tmp_path / "str.parquet", prepared_criteo, **{field: pa.array(["a"] * 500)}),
                       f"column '{field}' holds string"),
        "float ids": (write_split(tmp_path / "float.parquet", prepared_criteo,
                                  **{field: pa.array(np.full(500, 2.7), pa.float64())}), "holds double"),
        "string label": (write_split(tmp_path / "lab.parquet", prepared_criteo, label=pa.array(["1"] * 500)),
                         "column 'label' holds string"),
        "label 2": (write_split(tmp_path / "two.parquet", prepared_criteo, label=pa.array(np.full(500, 2.0, np.float32))),
                    "row 0: label 2.0 is not 0 or 1"),
        "missing file": (tmp_path / "nope.parquet", "no such Parquet file"),
        "not parquet": (tmp_path / "text.parquet", "not a readable Parquet file"),
    }
    (tmp_path / "text.parquet").write_text("label,C1\n1,2\n")
    for data, expected in cases.values():
        fails(["score", str(exported), str(data)], capsys, str(data), expected)
        fails(["evaluate", str(runs["dcnv2"]), "--data", str(data), "--out", str(tmp_path / "ev2")], capsys, expected)
    # ids outside the vocabulary read the OOV row in both forms of the model
    vocab = prepared_criteo.feature_map.categorical[0].num_embeddings
    wild = write_split(tmp_path / "wild.parquet", prepared_criteo,
                       **{field: pa.array(np.full(500, vocab + 7, np.int32))})
    oov = write_split(tmp_path / "oov.parquet", prepared_criteo, **{field: pa.array(np.full(500, 1, np.int32))})
    for model in (exported, runs["dcnv2"] / "compress" / "01_afm" / "checkpoint.pt"):
        scores = []
        for data in (wild, oov):
            assert main(["score", str(model), str(data), "--out", str(tmp_path / "s.parquet")]) == 0
            scores.append(pq.read_table(tmp_path / "s.parquet")["score"].to_numpy())
        np.testing.assert_array_equal(scores[0], scores[1])
    capsys.readouterr()


def test_4_a_run_directory_works_from_another_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "exp.yaml").write_text("""
name: rel
dataset: {name: syn, layout: criteo_tsv, raw: [raw/gen.txt], output: prepared, min_count: 2,
          synthetic: {kind: criteo, rows: 4000, seed: 3}}
model: {name: dnn, hidden: [8], embedding: {dim: 4}}
trainer: {batch_size: 512, eval_batch_size: 4096, progress: false, threads: 1, run_dir: runs/rel,
          checkpoint_every_steps: 2}
""")
    monkeypatch.chdir(project)
    assert main(["train", "exp.yaml"]) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = project / "runs" / "rel"
    assert main(["export", str(run), "--out", "m.pt"]) == 0
    assert main(["train", "--resume", str(run)]) == 0  # the data is found, not prepared again
    out = capsys.readouterr()
    assert "preparing dataset" not in out.err and not (elsewhere / "prepared").exists()
    manifest = json.loads(manifest_path(elsewhere / "m.pt").read_text())
    assert not Path(manifest["source"]["checkpoint"]).is_absolute()
    assert json.loads(RunDir(run).data_json.read_text())["prepared"] == "../../prepared"


def kill_when(proc: subprocess.Popen, seen: callable, deadline: float = 120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``seen()`` is true; False if it finished first."""
    stop = time.monotonic() + deadline
    while proc.poll() is None and time.monotonic() < stop:
        if seen():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


def cli(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main(sys.argv[1:]))",
                             *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_5_kill_9_during_prepare_and_export_leaves_litter_that_the_next_run_removes(
        runs: dict[str, Path], big_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ds.yaml"
    out = tmp_path / "prep"
    config.write_text(f"dataset: {{name: k, layout: criteo_tsv, raw: [{big_raw}], output: {out}}}\n")
    proc = cli("prepare", str(config))
    assert kill_when(proc, lambda: any(p.name.startswith(".prep.tmp-") for p in tmp_path.iterdir()))
    assert litter(tmp_path) and not out.exists()
    assert main(["prepare", str(config)]) == 0
    assert litter(tmp_path) == [] and (out / "feature_map.json").is_file()
    assert not (tmp_path / ".prep.lock").exists()  # the killed holder's lock file is taken over, then removed
    model = tmp_path / "m.pt"
    killed = False
    for _ in range(5):  # the scratch file lives about a second: catch it, or try again
        proc = cli("export", str(runs["dcnv2"]), "--out", str(model))
        if kill_when(proc, lambda: any(p.name.startswith(".m.pt.tmp-") for p in tmp_path.iterdir())):
            killed = True
            break
    assert killed and litter(tmp_path)
    assert main(["export", str(runs["dcnv2"]), "--out", str(model)]) == 0
    assert litter(tmp_path) == [] and manifest_path(model).is_file()
    capsys.readouterr()


def test_6_a_reader_sees_a_matching_model_and_manifest_between_the_two_renames(
        runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.pt"
    export_model(runs["dcnv2"], model)
    real_replace = os.replace

    def die_after_the_model(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        if Path(dst) == model:
            raise KeyboardInterrupt  # stands for a kill between the two renames

    monkeypatch.setattr("deploy.export.os.replace", die_after_the_model)
    with pytest.raises(KeyboardInterrupt):
        export_model(runs["dcnv2"], model, "latest")
    monkeypatch.undo()
    assert pending_manifest_path(model).is_file()  # the new model's manifest, not yet renamed
    assert main(["score", str(model), str(RunDir(runs["dcnv2"]).prepared_data() / "test.parquet")]) == 0
    assert main(["export", str(runs["dcnv2"]), "--out", str(model), "--stage", "latest"]) == 0
    assert not pending_manifest_path(model).exists()
    capsys.readouterr()


def test_7_an_alias_bomb_is_refused_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    levels = ["a: &a {x: 1, y: 2, z: 3, w: 4}"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} {{p: *{chr(97 + i)}, q: *{chr(97 + i)}, r: *{chr(97 + i)}, s: *{chr(97 + i)}}}"
        for i in range(12)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\ndataset: {name: b, layout: criteo_tsv, output: o}\n")
    assert len(bomb.read_bytes()) < 1000
    started = time.perf_counter()
    fails(["prepare", str(bomb)], capsys, str(bomb), "expands to more than 100,000 values")
    assert time.perf_counter() - started < 2.0


def test_7_a_deeply_nested_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """3,000 levels of brackets (6 kB) once ended prepare and train in a RecursionError; a chain of
    aliases nests as deep in fewer bytes of nesting."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("dataset: {name: d, layout: criteo_tsv, output: o}\nmodel: " + "[" * 3000 + "]" * 3000 + "\n")
    for command in ("prepare", "train"):
        fails([command, str(deep)], capsys, f"{deep}:2", "nests more than 100 levels")
    chain = tmp_path / "chain.yaml"
    chain.write_text("\n".join(["a0: &a0 [1]", *(f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 300))]) + "\n")
    fails(["train", str(chain)], capsys, str(chain), "nests more than 100 levels through its &anchor")
    fails(["train", str(ROOT / "configs" / "experiments" / "synthetic_dnn.yaml"), "model.hidden=" + "[" * 500 + "]" * 500],
          capsys, "<command line>", "nests more than 100 levels")


def test_8_config_mistakes_are_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = ROOT / "configs" / "experiments" / "synthetic_dnn.yaml"
    fails(["train", str(exp), "model.hidden=[-5]"], capsys, "<command line>", "model.hidden.0")
    fails(["train", str(exp), "model.cross_layers=3"], capsys, "<command line>", "unknown key 'model.cross_layers'")
    fails(["generate", "--rows", "0", "--out", str(tmp_path / "g.txt")], capsys, "<command line>", "--rows 0")
    fails(["generate", "--noise", "C5,I1", "--out", str(tmp_path / "g.txt")], capsys, "<command line>", "['I1']")
    assert not (tmp_path / "g.txt").exists()
    fails(["prepare", str(exp), "dataset.synthetic.noise=[C3, I1]"], capsys, "synthetic.yaml", "dataset.synthetic", "['I1']")
    fails(["compress", str(exp), "--sweep", "size=1,2"], capsys, str(exp), "varies target_mb, not 'size'")
    fails(["compress", str(exp), "--sweep", "target_mb=2,-1"], capsys, str(exp), "distinct positive sizes")
    nolabel = tmp_path / "nolabel.yaml"
    nolabel.write_text("dataset: {name: g, layout: generic, separator: ',', header: true, output: o, "
                       "columns: [{name: x, kind: numeric}]}\n")
    fails(["prepare", str(nolabel)], capsys, str(nolabel), "exactly one column of kind 'label'")
    two = tmp_path / "two.yaml"
    two.write_text("dataset: {name: s, layout: criteo_tsv, raw: [a.txt, b.txt], output: o, "
                   "synthetic: {kind: criteo, rows: 10}}\n")
    fails(["prepare", str(two)], capsys, str(two), "exactly one raw file")
    negative = tmp_path / "neg.yaml"
    negative.write_text("dataset: {name: n, layout: criteo_tsv, output: o, min_count_per_field: {C1: -2}}\n")
    fails(["prepare", str(negative)], capsys, str(negative), "min_count_per_field.C1")
    child = tmp_path / "child.yaml"
    child.write_text("extends: missing_parent.yaml\n")
    fails(["prepare", str(child)], capsys, f"{child}: 'extends' names missing_parent.yaml")


def test_9_an_output_that_cannot_be_written_fails_before_the_work(runs: dict[str, Path], exported: Path,
                                                                  prepared_criteo: PrepareResult, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a path under a file cannot be written, whoever runs the test
    config = tmp_path / "ds.yaml"
    config.write_text(f"dataset: {{name: w, layout: criteo_tsv, raw: [{ROOT / 'tests/data/criteo_kaggle_train.head200.tsv'}], "
                      f"output: {blocker / 'out'}}}\n")
    fails(["prepare", str(config)], capsys, str(blocker), "cannot be a directory")
    test = prepared_criteo.output / "test.parquet"
    fails(["evaluate", str(exported), "--data", str(test), "--out", str(blocker / "ev")], capsys, "cannot be a directory")
    fails(["export", str(runs["dcnv2"]), "--out", str(blocker / "m.pt")], capsys, "cannot be a directory")
    fails(["score", str(exported), str(test), "--out", str(blocker / "s.parquet")], capsys, "cannot be a directory")
    assert blocker.read_text() == "not a folder"


class Evil:
    def __reduce__(self) -> tuple:
        return (print, ("this would run code",))


def test_10_unsafe_checkpoints_and_malformed_manifests(runs: dict[str, Path], exported: Path, prepared_criteo: PrepareResult,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "run" / "checkpoints" / "best.pt"
    evil.parent.mkdir(parents=True)
    for name in ("feature_map.json", "data.json"):
        (tmp_path / "run" / name).write_text((runs["dcnv2"] / name).read_text())
    torch.save({"model": Evil()}, evil)
    line = fails(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.pt")], capsys, str(evil),
                 "not a checkpoint this project wrote, and it may be unsafe")
    assert "weights_only" not in line
    test = prepared_criteo.output / "test.parquet"
    copy = tmp_path / "e.pt"
    copy.write_bytes(exported.read_bytes())
    for broken in ("{not json", json.dumps({"file_sha256": "x"}), json.dumps([1, 2])):
        manifest_path(copy).write_text(broken)
        fails(["score", str(copy), str(test)], capsys, str(manifest_path(copy)), "not a manifest written by ctr export")
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "protects against corruption" in readme and "does not protect against a deliberate swap" in readme


@pytest.mark.slow
def test_11_a_second_prepare_into_the_same_output_fails_naming_the_first(big_raw: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ds.yaml"
    out = tmp_path / "prep"
    config.write_text(f"dataset: {{name: l, layout: criteo_tsv, raw: [{big_raw}], output: {out}}}\n")
    first = cli("prepare", str(config))
    lock = tmp_path / ".prep.lock"
    deadline = time.monotonic() + 60
    while not (lock.is_file() and lock.read_text() == str(first.pid)) and time.monotonic() < deadline:
        time.sleep(0.002)
    try:
        assert first.poll() is None, "the first prepare ended before the second could start"
        fails(["prepare", str(config)], capsys, str(out), f"another ctr prepare (pid {first.pid}) is writing it")
    finally:
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()[-2000:]
    assert main(["prepare", str(config)]) == 0  # the lock went with its holder
    capsys.readouterr()
