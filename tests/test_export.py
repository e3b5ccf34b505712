"""Edge export: TorchScript files that a torch-only process loads, parity, OOV ids, bad files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.edge import splitmix64
from deploy.export import ExportError, export_model, load_edge, manifest_path
from features.hashing import hash_torch
from features.prepare import PrepareResult
from pipelines.evaluate import score_parquet

pytestmark = pytest.mark.slow


def test_scriptable_hash_equals_the_training_hash() -> None:
    values = torch.tensor([[0, 1, 2, 2**40, -5, 123456789]])
    keys = torch.tensor([[7], [-3], [2**62]])
    assert torch.equal(splitmix64(values, keys), hash_torch(values, keys))


FRESH = """
import sys, torch
model = torch.jit.load(sys.argv[1])
cases = torch.load(sys.argv[2])
for dense, ids, expected in cases:
    with torch.no_grad():
        got = model(dense, ids)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert float((got - expected).abs().max()) <= 1e-6, float((got - expected).abs().max())
leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu', 'ctr', 'features', 'deploy'))
assert not leaked, leaked
print('ok', len(cases))
"""


@pytest.mark.parametrize(("run", "stage", "embeddings"), [("dcnv2", None, "fp32"), ("dcnv2", "latest", "fp32"),
                                                          ("dcnv2", "latest", "int8"), ("unified", "latest", "fp16")])
def test_a_torch_only_process_runs_each_export_at_any_batch_size(runs: dict[str, Path], prepared_criteo: PrepareResult,
                                                                  tmp_path: Path, run: str, stage: str | None,
                                                                  embeddings: str) -> None:
    out = tmp_path / "model.pt"
    manifest = export_model(runs[run], out, stage, embeddings)
    assert manifest["parity"]["max_abs_diff"] <= (1e-5 if embeddings == "fp32" else 1e-1)
    assert abs(manifest["parity"]["auc_diff"]) <= 5e-4
    model = load_edge(out)
    fmap = prepared_criteo.feature_map
    gen = torch.Generator().manual_seed(0)
    vocab = torch.tensor([f.num_embeddings for f in fmap.categorical])
    cases = []
    for batch in (1, 7, 4096):
        ids = (torch.rand(batch, len(vocab), generator=gen) * vocab).long()
        dense = torch.rand(batch, len(fmap.dense), generator=gen)
        with torch.no_grad():
            cases.append((dense, ids, model(dense, ids)))
    torch.save(cases, tmp_path / "cases.pt")
    done = subprocess.run([sys.executable, "-c", FRESH, str(out), str(tmp_path / "cases.pt")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("ok 3"), done.stderr[-2000:]


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
