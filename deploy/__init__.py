"""Edge export: one self-contained file per model (TorchScript or ONNX) that scores a raw log row,
its manifest and parity check, and the scorers that read it back."""
