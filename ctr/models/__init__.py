"""The model registry: ``model.name`` -> its spec (config class and dense arch), and ``build_model``,
which maps a ``model:`` config section plus a checkpoint's structure steps onto a ``CTRModel``.

Adding a model: one file in this package (its config class, dense arch and ``SPEC``) and one line
in ``MODELS``.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import torch
from pydantic import Field, TypeAdapter
from torch import nn

from common.errors import ConfigError
from ctr.models import dcnv2, deepfm, dnn, finalmlp, lr
from ctr.models.base import FIRST_ORDER_DIM, ArchShape, CTRModel, FieldProjection, LowRankLinear, ModelSpec
from ctr.modules import META
from ctr.modules.hashed import HashedSparseArch
from ctr.modules.sparse import SparseArch, make_sparse_arch, prefix_columns
from ctr.structure import Layout, Step
from features.feature_map import FeatureMap

MODELS: dict[str, ModelSpec] = {
    "lr": lr.SPEC,
    "dnn": dnn.SPEC,
    "deepfm": deepfm.SPEC,
    "dcnv2": dcnv2.SPEC,
    "finalmlp": finalmlp.SPEC,
}

ModelConfig = Annotated[Union[tuple(spec.config for spec in MODELS.values())], Field(discriminator="name")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ModelConfig)


def model_config(**values: Any) -> Any:
    """The config class that ``values['name']`` selects, validated (unknown keys are errors)."""
    return _ADAPTER.validate_python(values)


SPARSE_ARCHS: dict[str, type[nn.Module]] = {"per_field": SparseArch, "unified": HashedSparseArch, "hashed": HashedSparseArch}


def capabilities(cfg: Any) -> frozenset[str]:
    """What may be done to the model ``cfg`` describes: its spec's own, and its tables' when it has any."""
    spec = MODELS[cfg.name]
    return spec.capabilities | (SPARSE_ARCHS[cfg.embedding.kind].CAPABILITIES if spec.embeddings else frozenset())


def described(cfg: Any) -> str:
    """The model as a refusal names it: its name, and the embedding kind when it has tables."""
    tables = f" with embedding kind '{cfg.embedding.kind}'" if MODELS[cfg.name].embeddings else " (no embedding tables)"
    return f"model '{cfg.name}'{tables}"


def model_layout(fmap: FeatureMap, cfg: Any, steps: tuple[Step, ...] | list[Step] = ()) -> Layout:
    return Layout.replay(steps, len(fmap.categorical), cfg.embedding.dim)


def build_model(fmap: FeatureMap, cfg: Any, device: torch.device = META,
                steps: tuple[Step, ...] | list[Step] = ()) -> CTRModel:
    """The model ``cfg.name`` names, with the structure ``steps`` recorded. Tables stay on the meta
    device (the default) until DistributedModelParallel places them; ``device=cpu`` gives a plain,
    unsharded model."""
    spec = MODELS[cfg.name]
    allowed = capabilities(cfg)
    refused = next((s for s in steps if s.needs not in allowed), None)
    if refused is not None:
        raise ConfigError(f"{refused.by or 'the checkpoint'}: its {refused.kind} step needs {refused.needs}, which "
                          f"{described(cfg)} does not allow (rebuild it from a checkpoint of a model that does)")
    layout = model_layout(fmap, cfg, steps)
    fields, dim = fmap.categorical, cfg.embedding.dim
    embedding = make_sparse_arch(fields, cfg.embedding, device, layout) if spec.embeddings else None
    first_order = (SparseArch([f.name for f in fields], [int(f.num_embeddings or 0) for f in fields], FIRST_ORDER_DIM,
                              cfg.embedding.init_range, prefix="lr", device=device) if spec.first_order else None)
    projection = FieldProjection(len(fields), layout.projection_rank, dim) if layout.projection_rank else None
    num_keys = embedding.num_keys if embedding is not None else 0
    wide, num_dense = num_keys * dim, len(fmap.dense)
    widths = layout.flat_widths
    columns = torch.cat([prefix_columns(widths, dim), wide + torch.arange(num_dense)]) if widths else None
    flat_width = len(columns) if columns is not None else wide + num_dense
    arch = spec.arch(cfg, ArchShape(flat_width, num_keys, dim, num_dense))
    model = CTRModel(embedding, first_order, projection, columns, arch, dim, num_dense, allowed)
    for path in layout.folded_norms:
        model.set_submodule(path, nn.Identity())
    for path, rank in layout.factorized.items():
        linear = model.get_submodule(path)
        model.set_submodule(path, LowRankLinear(linear.in_features, rank, linear.out_features))
    return model
