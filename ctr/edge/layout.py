"""What an edge file holds, decided once: which values its vocabulary ships, how wide their
fingerprints are, how many table rows each field keeps, and the bytes of every part.

``ctr.edge.model`` builds the file's modules from these decisions, and the compression stages plan
their budgets with the same byte rules (``row_bytes``), so "the model is N bytes" means the same
everywhere: the whole file a device holds, vocabulary and transforms included.

A field's lookup is by *slot*: slot 0 is a value the file does not ship (unseen, rare under min
count, or removed by row selection: all read what the out-of-vocabulary id reads), slot 1 is a
blank, slots 2.. are the shipped values in fingerprint order, so a value's table row is implied by
its position in the sorted fingerprints. A value is shipped only when it reads something else than
an unknown value would.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

from ctr.models.base import CTRModel
from ctr.modules.sparse import SparseArch
from features.feature_map import FeatureMap
from features.hashing import BLANK_KEY, int_keys, token_keys
from features.vocab import BLANK_ID, FIRST_VALUE_ID, OOV_ID

SPECIAL_SLOTS = 2  # slot 0: not shipped (reads the OOV id's row), slot 1: blank
FALSE_MATCH = 2.0**-12  # the chance that an unseen value's fingerprint equals a shipped one, at most
FINGERPRINT_BITS = (16, 32, 64)
SCALE_BIAS_BYTES = 4  # an fp16 scale and an fp16 bias per quantized row
FORMAT_CODES = {"fp32": 32, "fp16": 16, "int8": 8}  # storage of a table without its own quantize bits
DENSE_PARAM_BYTES = 4  # the dense layers and projections are stored as float32


def fingerprints(keys: np.ndarray, bits: int) -> np.ndarray:
    """The top ``bits`` of each int64 key (arithmetic shift, so they fit a signed ``bits``-bit integer)."""
    return keys >> (64 - bits)


def fingerprint_bits(keys: np.ndarray, known: np.ndarray | None = None) -> int:
    """The narrowest width at which an unseen value matches one of the ``n`` shipped ones with
    chance n / 2^bits <= 2^-12, no two shipped values share a fingerprint, and no ``known`` value
    that is not shipped (below min count's cut it is not even known; removed by row selection it
    is, and may be frequent) shares one with a shipped value."""
    for bits in FINGERPRINT_BITS[:-1]:
        if keys.size > FALSE_MATCH * 2.0**bits:
            continue
        shipped = fingerprints(keys, bits)
        if np.unique(shipped).size == keys.size and (known is None or not np.isin(fingerprints(known, bits), shipped).any()):
            return bits
    return FINGERPRINT_BITS[-1]


@lru_cache(maxsize=8)
def _keys_of_file(path: str, mtime_ns: int) -> np.ndarray:
    """The vocabulary's ``key`` column; a vocabulary prepared before keys were stored has its tokens hashed."""
    if "key" in pq.read_schema(path).names:
        return pl.read_parquet(path, columns=["key"])["key"].to_numpy()
    tokens = pl.read_parquet(path, columns=["token"])["token"]
    return token_keys(tokens.to_arrow()) if tokens.dtype == pl.String else int_keys(tokens.to_numpy())


def vocabulary_keys(data_dir: Path, fmap: FeatureMap) -> list[np.ndarray]:
    """Per categorical field, the token key of each vocabulary value (index = id - FIRST_VALUE_ID)."""
    out = []
    for f in fmap.categorical:
        path = data_dir / str(f.vocab_file)
        out.append(_keys_of_file(str(path), path.stat().st_mtime_ns))
    return out


@dataclass(frozen=True)
class FieldSlots:
    """One field's vocabulary in the edge file: the feature id behind every slot, and the keys of
    the shipped values (slots 2..) in fingerprint order, at ``bits`` bits."""

    ids: np.ndarray  # int64 [slots]: OOV, blank, then the shipped values' ids
    keys: np.ndarray  # int64 [slots - 2]
    bits: int


def field_slots(value_keys: np.ndarray, shipped: np.ndarray) -> FieldSlots:
    """``shipped``: feature ids (>= FIRST_VALUE_ID) the file must tell apart from an unknown value."""
    keys = value_keys[shipped - FIRST_VALUE_ID]
    others = np.ones(value_keys.size, dtype=bool)
    others[shipped - FIRST_VALUE_ID] = False
    bits = fingerprint_bits(keys, value_keys[others])
    order = np.argsort(fingerprints(keys, bits), kind="stable")
    ids = np.concatenate([[OOV_ID, BLANK_ID], shipped[order]]).astype(np.int64)
    return FieldSlots(ids=ids, keys=keys[order], bits=bits)


def embedding_rows(arch: SparseArch) -> list[np.ndarray] | None:
    """Per field, the table row of every feature id (-1: removed, reads zeros); None without a remap."""
    if not arch.remapped:
        return None
    remap = arch.remap.numpy()
    starts = np.concatenate([[0], np.cumsum(arch.vocab_sizes)])
    return [remap[starts[f]:starts[f + 1]] for f in range(arch.num_fields)]


def shipped_ids(model: CTRModel, num_embeddings: list[int]) -> list[np.ndarray]:
    """Per field, the ids whose lookups differ from the OOV id's: every value of a field read by a
    first-order table or a hashed table (each value has its own weight or hash), else the values
    whose embedding row is not the OOV id's row."""
    everything = [np.arange(FIRST_VALUE_ID, n, dtype=np.int64) for n in num_embeddings]
    if model.first_order is not None or not isinstance(model.embedding, SparseArch):
        return everything
    rows = embedding_rows(model.embedding)
    if rows is None:
        return everything
    return [ids[r[ids] != r[OOV_ID]] for ids, r in zip(everything, rows)]


def edge_slots(model: CTRModel, fmap: FeatureMap, keys: list[np.ndarray]) -> list[FieldSlots]:
    vocab = [int(f.num_embeddings or 0) for f in fmap.categorical]
    return [field_slots(k, ids) for k, ids in zip(keys, shipped_ids(model, vocab))]


def row_bytes(width: int, code: int) -> int:
    """Bytes of one stored row: float32 / float16 values, or packed integer codes with their scale and bias."""
    if code in (32, 16):
        return width * code // 8
    return -(-width * code // 8) + SCALE_BIAS_BYTES


def field_codes(arch: SparseArch, fmt: str) -> list[int]:
    """Each field's storage code: its quantize stage's bits, else the export format's."""
    bits = arch.bits.tolist() if arch.quantized else [0] * arch.num_fields
    return [b if b > 0 else FORMAT_CODES[fmt] for b in bits]


def first_order_code(fmt: str) -> int:
    """First-order weights stay float: int8 codes of a one-value row would store more than they save."""
    return 32 if fmt == "int8" else FORMAT_CODES[fmt]


def vocabulary_bytes(slots: list[FieldSlots], hashed: bool) -> int:
    """Fingerprints (one padding value per width), plus (hashed embeddings, whose rows depend on the
    id) the id of every slot."""
    total = sum(s.keys.size * s.bits // 8 for s in slots) + sum(b // 8 for b in {s.bits for s in slots})
    return total + (sum(s.ids.size * 4 for s in slots) if hashed else 0)


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def miss_key(slots: FieldSlots) -> int:
    """A key that no shipped fingerprint matches and that is not the blank key: how a prepared row's
    out-of-vocabulary id is handed to the edge file (``ctr score`` on Parquet)."""
    taken = set(fingerprints(slots.keys, slots.bits).tolist())
    c = next(c for c in range(len(taken) + 2) if c not in taken and c << (64 - slots.bits) != BLANK_KEY)
    return c << (64 - slots.bits)


def id_keys(value_keys: list[np.ndarray], miss_keys: list[int]) -> list[np.ndarray]:
    """Per field, the key of every feature id: padding and OOV the field's miss key, then blank, then values."""
    return [np.concatenate([[miss, miss, BLANK_KEY], keys]).astype(np.int64) for keys, miss in zip(value_keys, miss_keys)]


def keys_of_ids(ids: np.ndarray, tables: list[np.ndarray]) -> np.ndarray:
    """Prepared ids [B, F] -> field keys [B, F]; an id outside a field's range is out of vocabulary."""
    out = np.empty(ids.shape, dtype=np.int64)
    for f, table in enumerate(tables):
        col = ids[:, f]
        out[:, f] = table[np.where((col >= 0) & (col < table.size), col, OOV_ID)]
    return out

