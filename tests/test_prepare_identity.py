"""The prepare that hashes tokens at parse time gives the ids, counts, rejects and splits of the
string prepare it replaced, on the suite's sets.

``tests/data/prepare_identity.json`` holds digests written by the string prepare (commit 63b1159):
per case, every vocabulary (token, count, id), every split (all columns, in row order, with its
row groups) and the rejects file. A change of ids or row order, however small, fails here, which is
what keeps trained runs valid across the two implementations. The raw files' digests are kept too,
so a changed generator is told apart from a changed prepare. ``python tests/test_prepare_identity.py
OUT.json`` writes the digests of the prepare it runs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from features.prepare import prepare
from features.schema import DatasetConfig
from pipelines.synthetic import generate

GOLDEN = Path(__file__).parent / "data" / "prepare_identity.json"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def frame_digest(df: pl.DataFrame) -> str:
    """Digest of a frame's columns in row order: numbers by their bytes, strings joined with NUL."""
    h = hashlib.sha256()
    for name in df.columns:
        col = df[name]
        h.update(name.encode())
        if col.dtype == pl.String:
            h.update("\0".join("<null>" if v is None else v for v in col.to_list()).encode())
        else:
            h.update(col.fill_null(-999).to_numpy().tobytes())
    return h.hexdigest()[:16]


def _cases(root: Path) -> dict[str, tuple[list[Path], dict[str, Any]]]:
    """The suite's kinds of input: Criteo random and order splits over two files, the numeric mode,
    Avazu's time split, and a file with rejected rows."""
    criteo, avazu = root / "criteo.txt", root / "avazu.csv"
    generate("criteo", 20_000, criteo, seed=7)
    generate("avazu", 5_000, avazu, seed=3)
    lines = criteo.read_text().splitlines(keepends=True)
    first, second, bad = root / "one.txt", root / "two.txt", root / "bad.txt"
    first.write_text("".join(lines[:600]))
    second.write_text("".join(lines[600:1000]))
    broken = lines[:3000]
    broken[10] = "1\t2\n"  # too few fields
    broken[20] = broken[20].replace("\t", "\tx", 1)  # I1 not an integer
    bad.write_text("".join(broken))
    return {
        "criteo_random": ([criteo], {"min_count": 2, "row_group_size": 2048}),
        "criteo_order_two_files": ([first, second], {"min_count": 1, "split": {"method": "order"}}),
        "criteo_numeric": ([criteo], {"min_count": 3, "integer_mode": "numeric", "min_count_per_field": {"C1": 50}}),
        "avazu_time": ([avazu], {"layout": "avazu_csv", "min_count": 2,
                                 "split": {"method": "time", "time_column": "hour"}}),
        "avazu_random": ([avazu], {"layout": "avazu_csv", "min_count": 1}),
        "criteo_rejects": ([bad], {"min_count": 2}),
    }


def digests(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (raw, options) in _cases(root).items():
        cfg = DatasetConfig(**{"name": "identity", "layout": "criteo_tsv", "output": str(root / name), **options})
        result = prepare(cfg, raw=raw)
        case: dict[str, Any] = {"raw": [_digest(p.read_bytes()) for p in raw]}
        for f in result.feature_map.categorical:
            vocab = pl.read_parquet(result.output / str(f.vocab_file)).select("token", "count", "id")
            case[f"vocab/{f.name}"] = frame_digest(vocab)
        for split in ("train", "valid", "test"):
            path = result.output / f"{split}.parquet"
            meta = pq.ParquetFile(path).metadata
            case[split] = frame_digest(pl.read_parquet(path))
            case[f"{split}/row_groups"] = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        rejects = result.output / "rejects.csv"
        case["rejects"] = frame_digest(pl.read_csv(rejects, infer_schema=False).with_columns(
            pl.col("file").str.split("/").list.last())) if rejects.exists() else None  # the file by its name
        out[name] = case
    return out


@pytest.fixture(scope="module")
def found(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return digests(tmp_path_factory.mktemp("identity"))


@pytest.mark.parametrize("case", sorted(json.loads(GOLDEN.read_text())))
def test_prepare_matches_the_string_prepare(found: dict[str, Any], case: str) -> None:
    golden = json.loads(GOLDEN.read_text())[case]
    assert found[case]["raw"] == golden["raw"], "the generator's output changed: compare prepares on the old raw files"
    assert {k: v for k, v in found[case].items()} == golden


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        Path(sys.argv[1]).write_text(json.dumps(digests(Path(tmp)), indent=1, sort_keys=True) + "\n")
