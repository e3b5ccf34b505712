"""What can be done to a model, declared once by the parts that allow it, and checked against a
recipe before its first stage runs.

A sparse arch declares what its tables allow (per-field tables: row selection, widths, factorised
and quantised rows; tables shared by hashed fields: none of these), a model's spec what its dense
arch allows (factorised layers) and whether it has an edge form. A structure step names the one it
uses, and a compression stage the ones its settings will use, so no stage or constructor tests a
model's name or embedding kind.
"""

from __future__ import annotations

SELECT_ROWS = "row selection"
NARROW_WIDTHS = "per-field widths"
FACTORIZE_EMBEDDINGS = "factorised embeddings"
FACTORIZE_LAYERS = "factorised layers"
QUANTIZE_ROWS = "quantised rows"
EDGE_FORM = "an edge file"

PER_FIELD_TABLES = frozenset({SELECT_ROWS, NARROW_WIDTHS, FACTORIZE_EMBEDDINGS, QUANTIZE_ROWS})
DENSE_ARCH = frozenset({FACTORIZE_LAYERS, EDGE_FORM})  # a model with embeddings and Linear layers
