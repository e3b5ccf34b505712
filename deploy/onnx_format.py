"""The edge model as ONNX, run by onnxruntime: for deployments outside Python and torch.

The exported graph is the same ``EdgeModel`` that TorchScript compiles (the trained dense arch
behind the raw transforms, the vocabulary, the torch-only tables and hashing), traced by torch's ONNX exporter at opset 18 with
a dynamic batch size. onnx, onnxscript and onnxruntime are only needed for this format
(``requirements/onnx.txt``); without them, TorchScript export works as before and this format says
how to add them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from common.errors import ExportError, one_line
from ctr.edge.model import EdgeModel

OPSET = 18
INPUTS = ("numbers", "keys")
INSTALL = "pip install --no-deps -r requirements/onnx.txt"


def require_onnx() -> Any:
    """The onnxruntime module, or a one-line error that says how to install the ONNX packages."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401 (torch's exporter needs it)
    except ImportError as exc:
        raise ExportError(f"{exc.name}: not installed; ONNX export and scoring need onnx, onnxscript and "
                          f"onnxruntime ({INSTALL} into this environment)") from None
    return onnxruntime


def write_onnx(edge: EdgeModel, numbers: torch.Tensor, keys: torch.Tensor, path: Path) -> None:
    """Trace ``edge`` on an example batch into ``path``; the batch dimension stays free."""
    require_onnx()
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(edge, (numbers, keys), dynamo=True, opset_version=OPSET, input_names=list(INPUTS),
                                    output_names=["probability"], dynamic_shapes=({0: batch}, {0: batch}), verbose=False)
    if program is None:
        raise ExportError(f"{path}: torch's ONNX exporter returned no program (export the TorchScript format)")
    program.save(str(path))


class OnnxModel:
    """An onnxruntime session behind the edge model's call: raw (numbers, keys) tensors -> probabilities."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ort = require_onnx()
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own untyped errors for a bad file)
            raise ExportError(f"{path}: onnxruntime cannot load it ({one_line(exc)}) "
                              "(export the model again)") from None

    def __call__(self, numbers: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, dict(zip(INPUTS, (numbers.numpy(), keys.numpy()))))[0]
        return torch.from_numpy(out)
