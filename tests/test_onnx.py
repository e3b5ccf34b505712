"""ONNX export: each model after a compression recipe runs under onnxruntime, in a process that
imports no project code (nor torch), with the parity the export checked; int8 tables and unified
hashing too; an install without the ONNX packages says how to add them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ExportError
from ctr.compress.recipe import run_recipe
from ctr.edge.layout import vocabulary_keys
from deploy.export import export_model, open_edge
from ctr.edge.raw import raw_columns
from features.hashing import BLANK_KEY
from features.prepare import PrepareResult

from conftest import copy_run, recipe_experiment

pytestmark = pytest.mark.slow

FRESH = """
import sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
cases = np.load(sys.argv[2])
for i in range(int(cases["n"])):
    got = session.run(None, {"numbers": cases[f"numbers{i}"], "keys": cases[f"keys{i}"]})[0]
    assert got.shape == cases[f"expected{i}"].shape, (got.shape, cases[f"expected{i}"].shape)
    diff = float(np.abs(got - cases[f"expected{i}"]).max())
    assert diff <= 1e-5, diff
leaked = sorted(m for m in sys.modules if m.split(".")[0] in
                ("torch", "torchrec", "fbgemm_gpu", "ctr", "features", "deploy", "common", "pipelines"))
assert not leaked, leaked
print("ok", int(cases["n"]))
"""


def cases_for(model: Path, prepared: PrepareResult, path: Path) -> None:
    """Raw rows at batch sizes 1, 7 and 2000: numbers of every magnitude and sign with blanks (NaN),
    token keys of known values, of unseen ones and of the blank, with the TorchScript export's
    answers: the same edge model, so ONNX must give them."""
    edge, _ = open_edge(model)
    keys_known = [np.concatenate([[BLANK_KEY], k]) for k in vocabulary_keys(prepared.output, prepared.feature_map)]
    numbers_in, tokens_in = raw_columns(prepared.feature_map.raw_layout)
    token_fields = [prepared.feature_map.categorical[[f.source for f in prepared.feature_map.categorical].index(t)]
                    for t in tokens_in]
    gen = np.random.default_rng(0)
    arrays = {}
    for i, batch in enumerate((1, 7, 2000)):
        numbers = np.round(gen.standard_normal((batch, len(numbers_in))) * 10.0 ** gen.integers(0, 9, (batch, len(numbers_in))))
        numbers[gen.random(numbers.shape) < 0.1] = np.nan
        keys = gen.integers(-2**63, 2**63 - 1, (batch, len(tokens_in)), dtype=np.int64)  # unseen values
        for c, f in enumerate(token_fields):
            known = keys_known[prepared.feature_map.categorical.index(f)]
            pick = gen.random(batch) < 0.8
            keys[pick, c] = known[gen.integers(0, known.size, int(pick.sum()))]
        with torch.no_grad():
            expected = edge(torch.from_numpy(numbers), torch.from_numpy(keys)).numpy()
        arrays |= {f"numbers{i}": numbers, f"keys{i}": keys, f"expected{i}": expected}
    np.savez(path, n=3, **arrays)


@pytest.mark.parametrize("model", ["dnn", "deepfm", "dcnv2", "finalmlp"])
def test_every_model_after_its_recipe_runs_under_onnxruntime_alone(baselines: dict[str, Path], prepared_criteo: PrepareResult,
                                                                    tmp_path: Path, model: str) -> None:
    run_dir = copy_run(baselines, model, tmp_path)
    cfg = recipe_experiment(prepared_criteo, run_dir, model, ["optfs", "optembed", "afm"])
    run_recipe(cfg, prepared_criteo.feature_map, prepared_criteo.output, run_dir)
    manifest = export_model(run_dir, tmp_path / "m.onnx", "latest", fmt="onnx")
    assert manifest["runtime"] == "onnx" and manifest["parity"]["max_abs_diff"] <= 1e-5
    export_model(run_dir, tmp_path / "m.pt", "latest")
    cases_for(tmp_path / "m.pt", prepared_criteo, tmp_path / "cases.npz")
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "m.onnx"), str(tmp_path / "cases.npz")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("ok 3"), done.stderr[-2000:]


def test_int8_tables_and_unified_hashing_export_to_onnx(runs: dict[str, Path], tmp_path: Path) -> None:
    int8 = export_model(runs["dcnv2"], tmp_path / "q.onnx", "latest", "int8", fmt="onnx")
    assert abs(int8["parity"]["auc_diff"]) <= 5e-4 and int8["embeddings"] == "int8"
    hashed = export_model(runs["unified"], tmp_path / "u.onnx", "latest", fmt="onnx")
    assert hashed["parity"]["max_abs_diff"] <= 1e-5


def test_without_the_onnx_packages_torchscript_still_exports(runs: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: import raises ImportError
    with pytest.raises(ExportError, match=r"onnxruntime: not installed.*pip install --no-deps -r requirements/onnx.txt"):
        export_model(runs["dcnv2"], tmp_path / "m.onnx", fmt="onnx")
    assert list(tmp_path.iterdir()) == []
    assert export_model(runs["dcnv2"], tmp_path / "m.pt")["runtime"] == "torchscript"
