"""FuxiCTR 2.3.10 side of the peer benchmarks; runs inside the peer venv (see peer_env.py), never ours.

It imports nothing of this project. ``prepare`` runs FuxiCTR's own preprocessing (its Criteo
``CustomizedFeatureProcessor`` with log-squared bucketing of I1-I13, then ``build_dataset``: Polars
statistics, Ray Data transform, Parquet) on headed CSV splits of the benchmark's raw file. ``train``
builds DNN or DCNv2 from the wheel's layers the way FuxiCTR's model_zoo does (the zoo is not in the
wheel) and trains with FuxiCTR's own ``BaseModel`` loop, ``RankDataLoader`` (Ray Data, parquet) and
dense optimizer. Each command prints one JSON line last.

Usage (peer venv python):
  peer_fuxictr.py prepare --csv-dir D --out O [--min-count 10]
  peer_fuxictr.py train --data O --model dnn|dcnv2 [--batch 4096] [--eval-steps N] [--grow-rows N --steps S]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from torch import nn

from fuxictr.datasets.criteo import CustomizedFeatureProcessor
from fuxictr.features import FeatureMap
from fuxictr.pytorch.dataloaders import RankDataLoader
from fuxictr.pytorch.layers import CrossNetV2, FeatureEmbedding, MLP_Block
from fuxictr.pytorch.models import BaseModel
from fuxictr.preprocess import build_dataset

DATASET_ID = "bench"
INTEGERS = [f"I{i}" for i in range(1, 14)]
CATEGORIES = [f"C{i}" for i in range(1, 27)]


def prepare(csv_dir: str, out: str, min_count: int) -> dict[str, float]:
    feature_cols = [
        {"name": INTEGERS, "active": True, "dtype": "float", "type": "categorical", "preprocess": "convert_to_bucket",
         "fill_na": 0},
        {"name": CATEGORIES, "active": True, "dtype": "str", "type": "categorical"},
    ]
    started = time.perf_counter()
    processor = CustomizedFeatureProcessor(feature_cols=feature_cols, label_col={"name": "label", "dtype": "float"},
                                           dataset_id=DATASET_ID, data_root=out)
    build_dataset(processor, *(os.path.join(csv_dir, f"{s}.csv") for s in ("train", "valid", "test")),
                  min_categr_count=min_count, data_format="csv", sep=",")
    return {"seconds": time.perf_counter() - started}


class PeerDNN(BaseModel):
    """FuxiCTR's DNN: flattened field embeddings into an MLP with one output."""

    def __init__(self, feature_map: FeatureMap, emb: int, hidden: list[int], lr: float, **kwargs) -> None:
        super().__init__(feature_map, model_id="DNN", **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, emb)
        self.mlp = MLP_Block(feature_map.num_fields * emb, hidden_units=hidden, hidden_activations="ReLU", output_dim=1)
        self.compile("adam", "binary_crossentropy", lr)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)
        return {"y_pred": self.output_activation(self.mlp(x))}


class PeerDCNv2(BaseModel):
    """FuxiCTR's DCNv2, parallel structure: a full-rank cross network beside an MLP, concatenated."""

    def __init__(self, feature_map: FeatureMap, emb: int, hidden: list[int], lr: float, cross_layers: int,
                 **kwargs) -> None:
        super().__init__(feature_map, model_id="DCNv2", **kwargs)
        width = feature_map.num_fields * emb
        self.embedding_layer = FeatureEmbedding(feature_map, emb)
        self.crossnet = CrossNetV2(width, cross_layers)
        self.parallel_dnn = MLP_Block(width, hidden_units=hidden, hidden_activations="ReLU", output_dim=None)
        self.fc = nn.Linear(width + hidden[-1], 1)
        self.compile("adam", "binary_crossentropy", lr)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)
        y = self.fc(torch.cat([self.crossnet(x), self.parallel_dnn(x)], dim=-1))
        return {"y_pred": self.output_activation(y)}


class Timeline:
    """At each of ``fit``'s validations: the step, the loop seconds so far (validations excluded) and
    the validation AUC, so time-to-AUC is measured the same way as ours (metrics.jsonl)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.evaluating = 0.0
        self.points: list[dict[str, float]] = []

    def wrap(self, model: BaseModel) -> None:
        inner_step, inner_evaluate = model.eval_step, model.evaluate
        last: dict[str, float] = {}

        def evaluate(*args, **kwargs) -> dict[str, float]:
            logs = inner_evaluate(*args, **kwargs)
            last.update(logs)
            return logs

        def eval_step() -> None:
            entered = time.perf_counter()
            loop = entered - self.started - self.evaluating
            inner_step()
            self.points.append({"step": model._total_steps, "loop_seconds": loop, "auc": last["AUC"]})
            self.evaluating += time.perf_counter() - entered

        model.eval_step, model.evaluate = eval_step, evaluate


def build(args: argparse.Namespace, feature_map: FeatureMap) -> BaseModel:
    common = {"emb": args.emb, "hidden": args.hidden, "lr": args.lr, "gpu": -1, "verbose": 0, "eval_steps": args.eval_steps,
              "model_root": os.path.join(args.data, "models"), "metrics": ["logloss", "AUC"],
              "embedding_regularizer": None, "net_regularizer": None}
    if args.model == "dnn":
        return PeerDNN(feature_map, **common)
    return PeerDCNv2(feature_map, cross_layers=args.cross_layers, **common)


def train(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    data = os.path.join(args.data, DATASET_ID)
    feature_map = FeatureMap(DATASET_ID, data)
    feature_map.load(os.path.join(data, "feature_map.json"), {"embedding_dim": args.emb})
    if args.grow_rows:  # a larger vocabulary, spread over the fields (ids in the data stay in range)
        extra = -(-args.grow_rows // len(feature_map.features))
        for spec in feature_map.features.values():
            spec["vocab_size"] += extra
    model = build(args, feature_map)
    os.makedirs(model.model_dir, exist_ok=True)  # where fit keeps its best checkpoint
    embedding_rows = sum(spec["vocab_size"] for spec in feature_map.features.values())
    dense_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embedding_layer"))
    train_gen, valid_gen, test_gen = RankDataLoader(
        feature_map, stage="both", batch_size=args.batch, shuffle=True, data_format="parquet",
        **{f"{s}_data": os.path.join(data, f"{s}.parquet") for s in ("train", "valid", "test")})
    result = {"embedding_rows": embedding_rows, "dense_params": dense_params, "threads": torch.get_num_threads()}
    if args.steps:  # a fixed number of steps of the same loop, after 3 warm-up steps (no validation)
        model._max_gradient_norm = 10.0
        model.train()
        batches = (batch for _ in range(args.steps + 3) for batch in train_gen)  # epochs again if short
        for _ in range(3):
            model.train_step(next(batches))
        started = time.perf_counter()
        for _ in range(args.steps):
            model.train_step(next(batches))
        return {**result, "samples_per_s": args.steps * args.batch / (time.perf_counter() - started),
                "steps": args.steps}
    timeline = Timeline()
    timeline.wrap(model)
    timeline.started = time.perf_counter()
    model.fit(train_gen, epochs=1, validation_data=valid_gen, max_gradient_norm=10.0)
    test = model.evaluate(test_gen)
    result = {**result, "timeline": timeline.points, "test_auc": test["AUC"], "test_logloss": test["logloss"]}
    if args.eval_steps:  # validations part-way: the last may come before the epoch's end
        return result
    loop = timeline.points[0]["loop_seconds"]  # one validation, at the epoch's end
    return {**result, "samples_per_s": train_gen.num_samples / loop, "loop_seconds": loop,
            "valid_auc": timeline.points[0]["auc"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--csv-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--min-count", type=int, default=10)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--model", choices=["dnn", "dcnv2"], required=True)
    t.add_argument("--batch", type=int, default=4096)
    t.add_argument("--emb", type=int, default=16)
    t.add_argument("--hidden", type=int, nargs="+", default=[400, 400, 400])
    t.add_argument("--cross-layers", type=int, default=3)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=2024)
    t.add_argument("--grow-rows", type=int, default=0)
    t.add_argument("--steps", type=int, default=0)
    t.add_argument("--eval-steps", type=int, default=None, help="validate every N steps (default: at the epoch's end)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = prepare(args.csv_dir, args.out, args.min_count) if args.command == "prepare" else train(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
