"""The edge vocabulary's false matches, measured (``python benchmarks/bench_vocabulary.py EDGE_FILE``).

An unseen value reads a shipped value's row when the top bits of its token key equal that value's
fingerprint; the width rule (``ctr/edge/layout.py``) bounds the chance at n / 2^bits <= 2^-12 per
field. This measures it two ways on the file's own data:
  1. per field, 4M random keys (what any unseen value's key is: uniform 64 bits): the share that matches;
  2. the test split's real values that training never saw (its raw rows' token keys that are not in
     the train vocabulary): the share that matches, and the test rows touched;
and the effect on test AUC: the file scoring the test split's raw rows (false matches and all) against
it scoring the same rows prepared (unseen values read as out-of-vocabulary, no false match possible).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from ctr.checkpoint import load_checkpoint
from ctr.compress.stage import plain_model
from ctr.edge.layout import edge_slots, fingerprints, vocabulary_keys
from ctr.edge.raw import raw_layout
from ctr.run_dir import RunDir
from deploy.raw_rows import raw_batches
from features.feature_map import FeatureMap
from features.parse import ROW
from features.split import SPLIT_COLUMN, split_expr
from pipelines.scoring import score_parquet

RANDOM_KEYS = 1 << 22


def test_lines(fmap: FeatureMap, out: Path) -> Path:
    """The raw lines of the test split (the split rule on the line positions), as their own log."""
    header = int(raw_layout(fmap).header)
    lines = pl.scan_lines(Path(fmap.sources[0].path), name="text", row_index_name=ROW).filter(pl.col(ROW) >= header)
    test = lines.with_columns((pl.col(ROW) - header).cast(pl.UInt64)).filter(
        split_expr(fmap.split_rule, fmap.rows_read).alias(SPLIT_COLUMN) == 2).select("text")
    test.sink_csv(out, include_header=False, quote_style="never")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("edge", type=Path)
    args = parser.parse_args()
    manifest = json.loads(Path(f"{args.edge}.manifest.json").read_text())
    run = RunDir(args.edge.parent / manifest["source"]["run_dir"])
    fmap = FeatureMap.load(run.root)
    checkpoint = args.edge.parent / manifest["source"]["checkpoint"]
    model = plain_model(fmap, load_checkpoint(checkpoint))
    known = vocabulary_keys(run.prepared_data(), fmap)
    slots = edge_slots(model, fmap, known)
    gen = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        raw = test_lines(fmap, Path(tmp) / "test.txt")
        tokens = {c: i for i, c in enumerate(c.name for c in raw_layout(fmap).columns if c.kind == "categorical")}
        keys = np.concatenate([b.keys for b in raw_batches(raw, raw_layout(fmap))])
        print("| field | shipped | bits | bound n/2^bits | random keys matched | unseen test values | matched | test rows touched |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        touched = np.zeros(keys.shape[0], dtype=bool)
        for f, s in zip(fmap.categorical, slots):
            shipped = np.sort(fingerprints(s.keys, s.bits))
            random_hits = np.isin(fingerprints(gen.integers(-2**63, 2**63 - 1, RANDOM_KEYS, dtype=np.int64), s.bits),
                                  shipped).mean()
            line = f"| {f.name} | {s.keys.size:,} | {s.bits} | {s.keys.size / 2.0**s.bits:.1e} | {random_hits:.1e} |"
            if f.source in tokens and f.transform == "token_v1":
                column = keys[:, tokens[f.source]]
                unseen = ~np.isin(column, known[fmap.categorical.index(f)])
                hits = unseen & np.isin(fingerprints(column, s.bits), shipped)
                touched |= hits
                line += f" {len(np.unique(column[unseen])):,} | {len(np.unique(column[hits])):,} | {int(hits.sum()):,} |"
            else:
                line += " (derived) | | |"
            print(line)
        print(f"\ntest rows with a false match: {int(touched.sum()):,} of {keys.shape[0]:,}")
        from_raw = score_parquet(args.edge, raw, None)
    prepared = score_parquet(args.edge, run.prepared_data() / fmap.splits["test"].file, None)
    print(f"test AUC on raw rows {from_raw['auc']:.6f}, on the prepared rows {prepared['auc']:.6f} "
          f"(difference {from_raw['auc'] - prepared['auc']:+.2e}; rows {from_raw['rows']:,} / {prepared['rows']:,})")


if __name__ == "__main__":
    main()
