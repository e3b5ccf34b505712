"""The ``ctr`` command line: one sub-command per job, arguments mapped straight onto job functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from common.errors import CheckpointError, ConfigError, DataError, ExportError, TrainingDiverged

STARTED = time.perf_counter()  # the command's start (after the interpreter's), for the start-up time it reports
USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingDiverged, ExportError)


def _generate(args: argparse.Namespace) -> None:
    from common.yaml_config import COMMAND_LINE
    from pipelines.synthetic import generate, generate_days

    kind, profile = args.profile or args.kind, args.profile is not None
    if args.days is None and args.drift:
        raise ConfigError(f"{COMMAND_LINE}: --drift without --days (give --days N: a drifting log is written one file per day)")
    if args.days is None:
        reports = [generate(kind, args.rows, args.out, seed=args.seed, profile=profile, noise=args.noise)]
    else:
        reports = generate_days(kind, args.rows, args.out, args.days, args.drift, seed=args.seed, profile=profile,
                                noise=args.noise)
    for report in reports:
        print(json.dumps(asdict(report), indent=2))


def _prepare(args: argparse.Namespace) -> None:
    from pipelines.prepare_job import run_prepare

    startup = time.perf_counter() - STARTED  # the imports a prepare needs: no torch, Ray or model configs
    result = run_prepare(args.config, args.overrides, args.raw, args.output, args.extend)
    fmap = result.feature_map
    rows = ", ".join(f"{name} {info.rows}" for name, info in fmap.splits.items())
    print(f"prepared {fmap.dataset}: {fmap.rows_read} rows read, {fmap.rows_rejected} rejected; {rows}; "
          f"{len(fmap.categorical)} categorical + {len(fmap.dense)} dense fields; "
          f"{result.seconds:.1f}s -> {result.output}")
    passes = {"start-up": startup, **result.passes}
    print("seconds per pass: " + ", ".join(f"{name} {sec:.2f}" for name, sec in passes.items()))


def _train(args: argparse.Namespace) -> None:
    from pipelines.train_job import run_train

    result = run_train(args.config, args.overrides, args.resume, use_ray=args.ray, init_from=args.init_from)
    print(json.dumps(result, indent=2))


def _compress(args: argparse.Namespace) -> None:
    from ctr.compress.recipe import format_report, format_sweep
    from pipelines.compress_job import run_compress, run_compress_sweep

    if args.sweep is None:
        print(format_report(run_compress(args.config, args.overrides)))
    else:
        print(format_sweep(run_compress_sweep(args.config, args.overrides, args.sweep)))


def _export(args: argparse.Namespace) -> None:
    from deploy.export import export_model

    manifest = export_model(args.run_dir, args.out, args.stage, args.embeddings, fmt=args.format)
    parity = manifest["parity"]
    print(f"exported {args.out} ({manifest['file_bytes']:,} bytes, {manifest['embeddings']} tables) from "
          f"{manifest['source']['checkpoint']}; parity on {parity['rows']:,} test rows: max |diff| "
          f"{parity['max_abs_diff']:.2e}, AUC diff {parity['auc_diff']:+.6f}; manifest beside it")


def _score(args: argparse.Namespace) -> None:
    from pipelines.scoring import score_parquet

    print(json.dumps(score_parquet(args.model, args.data, args.out), indent=2))


def _evaluate(args: argparse.Namespace) -> None:
    from pipelines.evaluate import evaluate
    from pipelines.report import comparison_table

    scores_from = None
    if args.ray:
        from ctr.config import RayConfig
        from pipelines.ray_evaluate import ray_scores

        cluster = RayConfig(address=args.ray_address)
        scores_from = lambda scorers, fields: ray_scores(args.data[0], scorers, fields, cluster)  # noqa: E731
    result = evaluate(args.models, args.data if len(args.data) > 1 else args.data[0], args.out, args.slice, args.top, scores_from=scores_from,
                      groups=args.group)
    print(comparison_table(result))
    for c in result["comparisons"]:
        print(f"DeLong test {c['model']} vs {c['against']}: AUC difference {c['difference']:+.5f}, "
              f"z {c['z']:.2f}, p {c['p_value']:.3g}")
    print(f"report: {args.out / 'report.html'}; metrics: {args.out / 'metrics.json'}")


def _tune(args: argparse.Namespace) -> None:
    from pipelines.tune import results_table, run_tune

    rows = run_tune(args.config, args.overrides, args.trials, args.budget_mb)
    print(results_table(rows, args.budget_mb))


def _run(args: argparse.Namespace) -> None:
    from pipelines.demo import run_chain, summary_table

    print(summary_table(run_chain(args.config, args.overrides)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write synthetic Criteo TSV / Avazu CSV with a planted teacher")
    gen.add_argument("--kind", choices=["criteo", "avazu"], default="criteo", help="the small-vocabulary default scenario")
    gen.add_argument("--profile", choices=["criteo", "avazu"], default=None,
                     help="instead: the real dataset's per-field distinct values and long tails (full size: 45.8M / 40.4M rows)")
    gen.add_argument("--rows", type=int, default=1_000_000)
    gen.add_argument("--seed", type=int, default=2024)
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--noise", type=lambda text: [n for n in text.split(",") if n], default=None,
                     help="comma-separated categorical fields to make pure noise, instead of the scenario's own")
    gen.add_argument("--days", type=int, help="write this many day files (day01, day02, ...) into the folder --out, "
                                               "each of --rows rows, under one teacher")
    gen.add_argument("--drift", type=float, default=0.0,
                     help="with --days and --profile: the share of each field's values replaced by new ones per day")
    gen.set_defaults(func=_generate)

    prep = sub.add_parser("prepare", help="raw files -> Parquet splits + feature_map.json")
    prep.add_argument("config", type=Path, help="dataset or experiment YAML (configs/datasets, configs/experiments)")
    prep.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. dataset.min_count=5")
    prep.add_argument("--raw", type=Path, nargs="+", help="raw files to read instead of dataset.raw")
    prep.add_argument("--output", type=Path, help="output directory instead of dataset.output")
    prep.add_argument("--extend", type=Path, metavar="PREPARED_DIR",
                      help="encode the raw files (a new day) against this prepared dataset: its values keep their ids, "
                           "new ones are appended")
    prep.set_defaults(func=_prepare)

    train = sub.add_parser("train", help="train a model from an experiment config")
    train.add_argument("config", type=Path, nargs="?", help="experiment YAML (configs/experiments/*.yaml)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.epochs=2")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    train.add_argument("--init-from", type=Path, metavar="RUN_DIR",
                       help="start from this run's final model, on a day prepared with ctr prepare --extend from its data")
    train.add_argument("--ray", action="store_true",
                       help="train on Ray Train (implied by trainer.num_workers > 1); see trainer.ray for where")
    train.set_defaults(func=_train)

    comp = sub.add_parser("compress", help="run the experiment's compression recipe on its trained checkpoint")
    comp.add_argument("config", type=Path, help="experiment YAML with a 'compress:' list of stages")
    comp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    comp.add_argument("--sweep", metavar="target_mb=A,B,C",
                      help="run the recipe at each size target (MB), each under compress/target_<MB>MB/, reusing the "
                           "stages before the one that sizes itself")
    comp.set_defaults(func=_compress)

    exp = sub.add_parser("export", help="write one TorchScript file (plus manifest) that runs with torch alone")
    exp.add_argument("run_dir", type=Path, help="a run directory (its best checkpoint) or a checkpoint file in one")
    exp.add_argument("--out", type=Path, required=True, help="the file to write (.pt for TorchScript, .onnx for ONNX)")
    exp.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript",
                     help="TorchScript (runs with torch alone) or ONNX opset 18 (runs with onnxruntime)")
    exp.add_argument("--stage", help="a compression stage of the run (e.g. 02_optembed, 'latest', or a sweep "
                                     "point's: target_2MB/03_quantize, target_2MB/latest)")
    exp.add_argument("--embeddings", choices=["fp32", "fp16", "int8"],
                     help="how the tables are stored (int8: per-row scale and bias); default: export.embeddings")
    exp.set_defaults(func=_export)

    score = sub.add_parser("score", help="score a Parquet file with an exported model")
    score.add_argument("model", type=Path)
    score.add_argument("data", type=Path, help="a prepared Parquet split, or (an edge file) a raw log in its layout")
    score.add_argument("--out", type=Path, help="write the scores to this Parquet file")
    score.set_defaults(func=_score)

    ev = sub.add_parser("evaluate", help="exact offline metrics of models on held-out Parquet, with a report")
    ev.add_argument("models", type=Path, nargs="+", help="exported .pt files, run directories or checkpoints")
    ev.add_argument("--data", type=Path, nargs="+", required=True,
                    help="a prepared split or any Parquet with the models' columns; or one per model: the same rows, "
                         "each prepared with its model's feature map (e.g. another min count); or (edge files) a raw log")
    ev.add_argument("--out", type=Path, default=Path("evaluation"), help="where metrics.json and report.html go")
    ev.add_argument("--slice", nargs="*", help="fields to report AUC per value for (their most frequent values)")
    ev.add_argument("--top", type=int, default=10, help="values per slice field")
    ev.add_argument("--group", action="append", metavar="FIELD",
                    help="report group AUC by this field (a user or device id, e.g. Avazu's device_id); repeatable")
    ev.add_argument("--ray", action="store_true", help="score with Ray Data (one task per file)")
    ev.add_argument("--ray-address", help="a Ray cluster to join (default: a private local instance)")
    ev.set_defaults(func=_evaluate)

    run = sub.add_parser("run", help="the whole chain: prepare, train, compress, export, evaluate, compare")
    run.add_argument("config", type=Path, help="experiment YAML")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    run.set_defaults(func=_run)

    tune = sub.add_parser("tune", help="search the recipe's knobs and the learning rates on Ray Tune (ASHA)")
    tune.add_argument("config", type=Path, help="experiment YAML with a compress: recipe")
    tune.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    tune.add_argument("--trials", type=int, default=8, help="trials to run (a killed tune resumes when run again)")
    tune.add_argument("--budget-mb", type=float, help="best validation AUC within this size; without it: the "
                                                       "size/AUC Pareto front")
    tune.set_defaults(func=_tune)

    demo = sub.add_parser("demo", help="the whole chain on the built-in synthetic dataset (DNN, OptFS + AFM)")
    demo.add_argument("--config", type=Path, default=Path("configs/experiments/synthetic_dnn_recipe.yaml"))
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    demo.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    logging.getLogger("ctr").setLevel(logging.INFO)  # our progress; libraries stay at WARNING
    # TorchRec's planner and fbgemm warn about defaults we choose on purpose (one line per table)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as exc:  # noqa: BLE001 (an expected error is one line; anything else is a bug: re-raised)
        message = user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def user_error(exc: BaseException) -> str | None:
    """The one-line message of an expected user error, found wherever it sits in the chain of
    causes (Ray Train and Ray Data wrap a worker's exception, often twice); None for a bug."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, USER_ERRORS):
            return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if isinstance(e, OSError) and e.filename is not None:
            return f"{e.filename}: {e.strerror or e} (check that the path exists and that you may read or write it)"
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


if __name__ == "__main__":
    sys.exit(main())
