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
from deploy.export import export_model, load_edge
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
    got = session.run(None, {"dense": cases[f"dense{i}"], "ids": cases[f"ids{i}"]})[0]
    assert got.shape == cases[f"expected{i}"].shape, (got.shape, cases[f"expected{i}"].shape)
    diff = float(np.abs(got - cases[f"expected{i}"]).max())
    assert diff <= 1e-5, diff
leaked = sorted(m for m in sys.modules if m.split(".")[0] in
                ("torch", "torchrec", "fbgemm_gpu", "ctr", "features", "deploy", "common", "pipelines"))
assert not leaked, leaked
print("ok", int(cases["n"]))
"""


def cases_for(model: Path, prepared: PrepareResult, path: Path) -> None:
    """Random ids (out-of-range ones included) at batch sizes 1, 7 and 2000, with the TorchScript
    export's answers: the same edge model, so ONNX must give them."""
    fmap = prepared.feature_map
    edge = load_edge(model)
    vocab = torch.tensor([f.num_embeddings for f in fmap.categorical])
    gen = torch.Generator().manual_seed(0)
    arrays = {}
    for i, batch in enumerate((1, 7, 2000)):
        ids = (torch.rand(batch, len(vocab), generator=gen) * (vocab + 3)).long() - 1  # -1 and vocab.. read OOV
        dense = torch.rand(batch, len(fmap.dense), generator=gen)
        with torch.no_grad():
            arrays |= {f"dense{i}": dense.numpy(), f"ids{i}": ids.numpy(), f"expected{i}": edge(dense, ids).numpy()}
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
