"""Edge export: TorchScript files that score raw log lines in a torch-only process, parity, OOV ids, bad files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import polars as pl
import pyarrow as pa

from deploy.export import ExportError, export_model, load_edge, manifest_path
from ctr.edge.raw import RawLines
from features.hashing import int_keys, token_keys
from features.schema import ColumnSpec, Layout
from features.transforms import criteo_bucket
from features.vocab import BLANK_ID, OOV_ID
from features.prepare import PrepareResult
from pipelines.scoring import score_parquet

from conftest import FRESH_LINES, raw_test_rows

pytestmark = pytest.mark.slow


def vocab_id(prepared: PrepareResult, field: str, token: object) -> int:
    vocab = pl.read_parquet(prepared.output / "vocab" / f"{field}.parquet")
    found = vocab.filter(pl.col("token") == token)["id"]
    return int(found[0]) if len(found) else OOV_ID


def edited_rows(lines: list[str], dense: torch.Tensor, ids: torch.Tensor,
                prepared: PrepareResult) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Rows the model never saw as such: an unseen token, a blank token, a blank integer, a negative
    and a huge integer, each with the ids ``ctr prepare`` gives it."""
    fields = [f.name for f in prepared.feature_map.categorical]
    col = {name: i + 1 for i, name in enumerate(["I%d" % k for k in range(1, 14)] + ["C%d" % k for k in range(1, 27)])}
    huge = 10**15
    bucket = int(pl.select(criteo_bucket(pl.lit(huge, dtype=pl.Int64))).item())
    edits = [("C3", "never-seen-token", OOV_ID), ("C5", "", BLANK_ID), ("I4", "", BLANK_ID),
             ("I2", "-2", vocab_id(prepared, "I2", -2)), ("I5", str(huge), vocab_id(prepared, "I5", bucket))]
    out_lines, out_ids = [], []
    for r, (field, text, new_id) in enumerate(edits):
        parts = lines[r].split("\t")
        parts[col[field]] = text
        out_lines.append("\t".join(parts))
        row = ids[r].clone()
        row[fields.index(field)] = new_id
        out_ids.append(row)
    return out_lines, dense[:len(edits)], torch.stack(out_ids)


@pytest.mark.parametrize(("run", "stage", "embeddings"), [("dcnv2", None, "fp32"), ("dcnv2", "latest", "fp32"),
                                                          ("dcnv2", "latest", "int8"), ("unified", "latest", "fp16")])
def test_a_torch_only_process_scores_raw_lines_as_ctr_score_scores_them_prepared(
        runs: dict[str, Path], synthetic_criteo: Path, prepared_criteo: PrepareResult, tmp_path: Path, run: str,
        stage: str | None, embeddings: str) -> None:
    out = tmp_path / "model.pt"
    manifest = export_model(runs[run], out, stage, embeddings)
    assert manifest["parity"]["max_abs_diff"] <= (1e-5 if embeddings == "fp32" else 1e-1)
    assert abs(manifest["parity"]["auc_diff"]) <= 5e-4
    assert "id remap" not in manifest["bytes_by_part"] and manifest["bytes_by_part"]["vocabulary"] > 0
    assert sum(manifest["bytes_by_part"].values()) == manifest["file_bytes"] == out.stat().st_size
    lines, dense, ids = raw_test_rows(synthetic_criteo, prepared_criteo, 300)
    extra_lines, extra_dense, extra_ids = edited_rows(lines, dense, ids, prepared_criteo)
    (tmp_path / "lines.txt").write_text("\n".join(lines + extra_lines), encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", FRESH_LINES, str(out), str(tmp_path / "lines.txt"), str(tmp_path / "got.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    with torch.no_grad():
        expected = load_edge(out)(torch.cat([dense, extra_dense]), torch.cat([ids, extra_ids]))
    assert got.shape == expected.shape == (len(lines) + len(extra_lines),)
    assert float((got - expected).abs().max()) <= 1e-6


def test_the_token_hash_matches_its_published_test_vectors() -> None:
    """The README's vectors: NumPy (prepare), TorchScript (raw lines) and any device agree on them."""
    vectors = {"": 3220344897584144929, "a": 9110145845580220759, "68fd1e64": -8308637510135970402,
               "é" * 9: -8644636165617837570}
    assert token_keys(pa.array(list(vectors))).tolist() == list(vectors.values())
    layout = Layout(separator=",", header=False, columns=[ColumnSpec(name="t", kind="categorical")])
    _, keys = torch.jit.script(RawLines(layout))(list(vectors))
    assert keys.flatten().tolist() == list(vectors.values())
    assert int_keys(np.array([0, 1, -1])).tolist() == [4302424893936767674, 7365434847858246849, -586949748924112688]


def test_an_id_out_of_range_reads_the_oov_row(runs: dict[str, Path], prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    export_model(runs["dcnv2"], tmp_path / "m.pt", "latest")
    model = load_edge(tmp_path / "m.pt")
    fmap = prepared_criteo.feature_map
    vocab = torch.tensor([f.num_embeddings for f in fmap.categorical])
    ids = torch.stack([vocab + 5, torch.full_like(vocab, -3), torch.full_like(vocab, 10**12), torch.ones_like(vocab)])
    with torch.no_grad():
        p = model(torch.zeros(4, len(fmap.dense)), ids)
    assert torch.isfinite(p).all()
    assert torch.allclose(p[:3], p[3].expand(3))  # every out-of-range id = the OOV id 1


def test_failed_parity_leaves_no_file(runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deploy.export.FP32_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="parity check failed"):
        export_model(runs["dcnv2"], tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_truncated_or_altered_files_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    export_model(runs["dcnv2"], out)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="truncated or replaced"):
        load_edge(out)
    with pytest.raises(RuntimeError):  # torch alone refuses it too
        torch.jit.load(str(out))
    altered = bytearray(data)
    altered[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(altered))
    with pytest.raises(ExportError, match="altered after export"):
        load_edge(out)
    manifest_path(out).unlink()
    with pytest.raises(ExportError, match="manifest"):
        load_edge(out)


def test_score_parquet_with_the_exported_file(runs: dict[str, Path], prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    manifest = export_model(runs["dcnv2"], out, "latest")
    split = prepared_criteo.output / prepared_criteo.feature_map.splits["test"].file
    result = score_parquet(out, split, tmp_path / "scores.parquet")
    assert result["rows"] == prepared_criteo.feature_map.splits["test"].rows
    assert 0.5 < result["auc"] <= 1.0
    import pyarrow.parquet as pq
    scores = pq.read_table(tmp_path / "scores.parquet")["score"].to_numpy()
    assert scores.shape == (result["rows"],) and np.all((scores > 0) & (scores < 1))
    assert manifest["bytes_by_part"]["embedding tables"] > 0


def test_the_export_and_score_commands(runs: dict[str, Path], prepared_criteo: PrepareResult, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    out = tmp_path / "m.pt"
    assert main(["export", str(runs["dcnv2"]), "--stage", "01_afm", "--out", str(out), "--embeddings", "int8"]) == 0
    assert "parity on" in capsys.readouterr().out and json.loads(manifest_path(out).read_text())["embeddings"] == "int8"
    split = prepared_criteo.output / prepared_criteo.feature_map.splits["test"].file
    assert main(["score", str(out), str(split)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == prepared_criteo.feature_map.splits["test"].rows
    assert main(["export", str(runs["dcnv2"]), "--stage", "09_nope", "--out", str(tmp_path / "x.pt")]) == 2
    assert "no compression stage '09_nope'" in capsys.readouterr().err


def test_score_and_evaluate_read_a_raw_log_as_its_prepared_split(runs: dict[str, Path], synthetic_criteo: Path,
                                                                 prepared_criteo: PrepareResult, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main
    from pipelines.evaluate import evaluate

    fmap = prepared_criteo.feature_map
    export_model(runs["dcnv2"], tmp_path / "m.pt", "latest")
    export_model(runs["unified"], tmp_path / "u.onnx", "latest", fmt="onnx")
    lines, _, _ = raw_test_rows(synthetic_criteo, prepared_criteo, fmap.splits["test"].rows)
    raw = tmp_path / "test.txt"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    split = prepared_criteo.output / fmap.splits["test"].file
    from_raw, prepared = score_parquet(tmp_path / "m.pt", raw, None), score_parquet(tmp_path / "m.pt", split, None)
    assert from_raw["rows"] == prepared["rows"] == len(lines)
    assert abs(from_raw["auc"] - prepared["auc"]) <= 1e-9 and abs(from_raw["logloss"] - prepared["logloss"]) <= 1e-6
    result = evaluate([tmp_path / "m.pt", tmp_path / "u.onnx"], raw, tmp_path / "eval", progress=False)
    assert abs(result["models"][0]["auc"] - prepared["auc"]) <= 1e-9 and len(result["comparisons"]) == 1
    with pytest.raises(ExportError, match="ONNX edge file takes raw rows"):
        score_parquet(tmp_path / "u.onnx", split, None)
    raw.write_text("\n".join([*lines[:3], "1\tnot-a-number" + "\t" * 38, *lines[3:5]]) + "\n", encoding="utf-8")
    assert main(["score", str(tmp_path / "m.pt"), str(raw)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {raw}:4: column 'I1': expected an integer"), err
