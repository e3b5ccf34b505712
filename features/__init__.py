"""Feature pipelines: raw click logs (Criteo, Avazu, any declared table) -> Parquet splits + feature map.

The package is the bottom layer of the project: it knows nothing of models, training or Ray, so that
a prepared dataset can be produced and inspected without importing torch's heavier parts.
"""
