"""One config class per embedding kind, told apart by ``kind`` (a discriminated union).

``per_field``: one exact table per field. ``unified``: feature multiplexing, every (field, chunk)
reads row h(field, chunk, id) mod M of one shared table (or ``num_tables`` sub-tables). ``hashed``:
the classic baseline, one hashed table per field, sizes proportional to vocabularies. Keys that do
not apply to a kind are errors that name the key, not silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter, field_validator, model_validator

from common.strict import Strict

FBGEMM_WIDTH_MULTIPLE = 4


class EmbeddingBase(Strict):
    dim: int = Field(default=16, gt=0)  # width of one chunk; a field is chunks x dim wide
    init_range: float = Field(default=0.05, gt=0.0)  # uniform(-r, r)

    @field_validator("dim")
    @classmethod
    def _fbgemm_width(cls, dim: int) -> int:
        if dim % FBGEMM_WIDTH_MULTIPLE:
            raise ValueError(f"embedding width {dim} is not a multiple of {FBGEMM_WIDTH_MULTIPLE} "
                             f"(fbgemm's embedding kernels need widths divisible by {FBGEMM_WIDTH_MULTIPLE})")
        return dim


class PerFieldEmbedding(EmbeddingBase):
    kind: Literal["per_field"] = "per_field"


class HashedSize(EmbeddingBase):
    """The size of hashed tables: ``num_rows`` (M) or ``budget_mb`` (fp32 bytes of all tables);
    fields with at most ``collisionless_max`` values keep an exact table of their own."""

    num_rows: int | None = Field(default=None, gt=0)
    budget_mb: float | None = Field(default=None, gt=0.0)
    collisionless_max: int = Field(default=64, ge=0)
    hash_seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> "HashedSize":
        if (self.num_rows is not None) + (self.budget_mb is not None) != 1:
            raise ValueError(f"embedding kind '{getattr(self, 'kind')}' needs exactly one of num_rows or budget_mb")
        return self


class HashedEmbedding(HashedSize):
    kind: Literal["hashed"] = "hashed"


class UnifiedEmbedding(HashedSize):
    kind: Literal["unified"] = "unified"
    num_tables: int = Field(default=1, ge=1)
    chunks: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)


EmbeddingConfig = Annotated[Union[PerFieldEmbedding, HashedEmbedding, UnifiedEmbedding], Field(discriminator="kind")]
_ADAPTER: TypeAdapter[EmbeddingConfig] = TypeAdapter(EmbeddingConfig)


def embedding_config(**values: object) -> EmbeddingConfig:
    """The config of the kind ``values['kind']`` names (default ``per_field``)."""
    return _ADAPTER.validate_python({"kind": "per_field", **values})
