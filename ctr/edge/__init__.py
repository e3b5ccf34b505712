"""The edge form of a model: what one exported file holds (``layout``: which values, rows and bytes),
the torch-only modules that hold it (``raw``: the transforms of raw rows; ``model``: vocabulary,
tables, the trained dense arch). It lives in ``ctr`` because the compression stages size their
budgets on it; ``deploy`` writes it to a file, checks it and reads it back."""
