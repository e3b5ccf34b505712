"""Edge export: one self-contained TorchScript file per model, its manifest and parity check.

Nothing is exported yet: this package is where the export job lands (see README, "What exists today").
"""
